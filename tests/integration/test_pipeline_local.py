"""The whole KFP DAG on this machine (kfp.local + the local backend), as `make demo` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLOWGRPO_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "flowgrpo.cli", "pipeline", "run", "--local", "--pipeline-root",
                           str(tmp_path / "p"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def _run_processes(run_id: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if f"FLOWGRPO_RUN_ID={run_id}".encode() in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
                    out.append(int(p))
            except OSError:
                pass
    return out


def test_dag_trains_evaluates_and_registers_a_candidate(tmp_path):
    r = _run(tmp_path, "--arg", "epochs=4", "--arg", "gate_min_improvement=-1", "--json")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    tasks = {t["task"]: t for t in summary["tasks"]}
    assert set(tasks) == {"fetch-model", "deploy-reward", "train", "teardown-2", "evaluate", "register", "teardown"}
    assert all(t["status"] == "SUCCESS" and t["seconds"] > 0 for t in tasks.values())
    assert summary["train_s"] == pytest.approx(tasks["train"]["seconds"])
    assert 0 < summary["overhead_share"] < 1

    # a registered version with alias candidate, pointing at complete weights, linked to the MLflow run
    assert summary["version"] == "1" and summary["aliases"] == ["candidate"]
    from flowgrpo import registry, storage

    storage.verify(summary["final_uri"])
    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    c = registry.client(uri)
    mv = c.get_model_version("flowgrpo-tiny", "1")
    assert mv.source == summary["final_uri"] and mv.run_id == summary["mlflow_run_id"]
    run_id = mv.tags["kfp.run_id"]
    assert "metric.preset/avg" in mv.tags
    run = c.get_run(summary["mlflow_run_id"])
    assert run.data.tags["kfp.run_id"] == run_id and run.info.status == "FINISHED"
    assert "reward_mean" in run.data.metrics and "eval/preset/avg" in run.data.metrics
    arts = {a.path for a in c.list_artifacts(summary["mlflow_run_id"], "eval")}
    assert {"eval/report.html", "eval/report.md"} <= arts

    # the reward server was torn down; KFP artifacts are there for the UI
    assert _run_processes(run_id) == []
    run_dir = Path(summary["run_dir"])
    assert "<table" in (run_dir / "evaluate" / "report").read_text()
    assert "version **1**" in (run_dir / "register" / "info").read_text()

    # re-running the register step of the same KFP run is idempotent (a retry does not add a version)
    from flowgrpo.pipeline import steps

    again = steps.register(model_name="flowgrpo-tiny", final_uri=summary["final_uri"],
                           mlflow_run_id=summary["mlflow_run_id"], run_id=run_id, metrics={"preset/avg": 0.0},
                           tracking_uri=uri)
    assert again["version"] == "1"


def test_failed_training_fails_the_run_and_still_tears_down(tmp_path):
    r = _run(tmp_path, "--arg", "epochs=1", "--arg", "overrides=data.train_prompts=/nonexistent/prompts.txt")
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "prompts.txt" in out  # the trainer's error reaches the task's log
    assert "Inner task failed" in out and "train" in out
    # both teardowns ran although training failed; no process of the run is left
    runs = list((tmp_path / "p" / "kfp").glob("flow-grpo-*"))
    assert len(runs) == 1
    assert (runs[0] / "teardown" / "executor_output.json").is_file()
    assert (runs[0] / "teardown-2" / "executor_output.json").is_file()
    assert not (runs[0] / "register").exists() and not (runs[0] / "evaluate").exists()
    home_runs = tmp_path / "home" / "local-runs"
    kept = [p.name for p in home_runs.iterdir()]
    assert kept and all(k.endswith(".logs") for k in kept)  # state gone, logs kept
    assert _run_processes(kept[0].removesuffix(".logs")) == []


@pytest.mark.parametrize("preset,base,pipeline_class", [
    ("tiny_flux_cpu", "tiny-flux", "FluxPipeline"),
    # an edit model: source images in the prompt rows, a consistency reward served by a reward server
    ("tiny_flux_kontext_cpu", "tiny-flux-kontext", "FluxKontextPipeline"),
    # video: clips scored frame by frame in training and evaluation, GIFs in the report
    ("tiny_wan_cpu", "tiny-wan", "WanPipeline"),
])
def test_the_preset_parameter_selects_the_model_family(tmp_path, preset, base, pipeline_class):
    """FLUX / FLUX.1-Kontext through the same DAG and components: only the preset changes (its tiny offline base,
    the family's adapter in training and evaluation, the family recorded on the MLflow run)."""
    r = _run(tmp_path, "--preset", preset, "--arg", "epochs=1", "--arg", "gate_min_improvement=-1", "--json")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["model_name"] == f"flowgrpo-{base}" and summary["aliases"] == ["candidate"]
    from flowgrpo import registry, storage

    storage.verify(summary["final_uri"])
    index = json.loads(Path(storage.local_path(summary["final_uri"]), "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class and "transformer" in index
    run = registry.client(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert "eval/preset/avg" in run.data.metrics
    if pipeline_class == "WanPipeline":  # evaluation stores each clip as an animated GIF
        gifs = list((tmp_path / "home").rglob("images/p*_i0.gif"))
        assert gifs and Image.open(gifs[0]).n_frames == 5
