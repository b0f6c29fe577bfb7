"""torchrun with 2 processes (gloo on CPU): plain DDP and DeepSpeed ZeRO-2 through accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _torchrun(tmp_path: Path, model_dir: Path, *overrides: str) -> tuple[Path, str]:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "integration" / "dist_worker.py"), str(REPO / "configs" / "tiny_cpu.yaml"),
           f"model.path={model_dir}", f"output_dir={out}", "train.epochs=2", "eval.every=2", "eval.num_prompts=4",
           "sample.num_batches_per_epoch=2", "train.gradient_accumulation_steps=1", "tracking.enabled=false", *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return out, p.stdout


def _check_identical_ranks(out: Path) -> None:
    r0, r1 = load_file(str(out / "rank-0.safetensors")), load_file(str(out / "rank-1.safetensors"))
    assert r0.keys() == r1.keys() and len(r0) > 0
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    rec = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rec if not r.get("final")] == [0, 1]
    # 2 ranks x 8 images x 2 iterations = 32 images = 4 groups of 8, each group spread over both ranks
    assert rec[0]["num_groups"] == 4 and rec[0]["group_size"] == 8.0
    assert "eval_reward" in rec[-1]


def test_torchrun_two_processes_identical_weights(tiny_model_dir, tmp_path):
    out, stdout = _torchrun(tmp_path, tiny_model_dir)
    assert "distributed_type=MULTI_CPU" in stdout
    _check_identical_ranks(out)
    assert (out / "final" / "model_index.json").is_file()


def test_torchrun_deepspeed_zero2_identical_weights(tiny_model_dir, tmp_path):
    pytest.importorskip("deepspeed")
    out, stdout = _torchrun(tmp_path, tiny_model_dir, "train.deepspeed_stage=2")
    assert "distributed_type=DEEPSPEED" in stdout
    _check_identical_ranks(out)
    ck = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert list((ck / "deepspeed").rglob("*optim_states.pt")), "ZeRO optimizer shards are checkpointed"
