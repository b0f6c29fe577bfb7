"""A crash in the middle of an evaluation (SIGKILL of the ``flowgrpo eval`` process once some images are scored)
and a re-run that finishes the job without re-scoring what was done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "prompts"
pytestmark = pytest.mark.slow


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.is_file() else []


def test_killed_eval_resumes_without_rescoring(tiny_model_dir, tmp_path):
    if not (DATA / "ocr" / "test.txt").is_file():
        pytest.skip(f"shared prompt data not found at {DATA} (the shared data directory is not checked out)")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flowgrpo.eval.cli", "--model", str(tiny_model_dir), "--suite", "ocr",
           "--data-root", str(DATA), "--num-prompts", "20", "--steps", "4", "--resolution", "32", "--batch-size", "2",
           "--device", "cpu", "--threads", "1", "--max-sequence-length", "16", "--no-cache", "--out", str(out),
           "--json"]
    env = {**os.environ, "FLOWGRPO_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    results = out / "candidate" / "ocr" / "results.jsonl"

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while len(_lines(results)) < 4:  # two batches scored
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no images scored within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _lines(results)
    done = sum(1 for ln in before if ln.endswith(b"\n"))
    assert 4 <= done < 20, f"{done} images scored before the kill"
    assert not (out / "report.html").exists()

    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resuming candidate {tiny_model_dir} on ocr: {done} of 20 images already scored" in r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    stats = summary["runs"]["candidate"]["ocr"]
    assert stats["resumed"] == done and stats["sampled"] == 20 - done and stats["scored"] == 20 - done
    after = _lines(results)
    assert len(after) == 20 and after[:done] == before[:done]  # done lines untouched, nothing scored twice
    keys = [(json.loads(ln)["prompt_index"], json.loads(ln)["image_index"]) for ln in after]
    assert sorted(keys) == [(i, 0) for i in range(20)]
    assert summary["metrics"]["candidate"]["ocr/n"] == 20
    assert (out / "report.html").is_file() and "<table id=\"metrics\">" in (out / "report.html").read_text()
