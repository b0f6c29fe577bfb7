"""MLflow tracking of a training run against a real ``mlflow server`` (sqlite backend, artifacts proxied to
S3 on a moto server), started once for the module: params, metrics equal to metrics.jsonl, image grids,
curves, lineage tags, MLFLOW_RUN_ID, an unreachable server (fail fast / metrics.jsonl only), a server killed
and restarted mid-run, a dead server never blocking, a failed run marked FAILED, and the embedded default."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from flowgrpo.recipe import run_training
from flowgrpo.tracking import RUN_FILE, MlflowLogger, TrackingUnavailableError

pytestmark = pytest.mark.slow

BUCKET = "mlflow-bucket"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# small epochs: one sampling batch of 8 images (one prompt group), 3 denoising steps
FAST = ("sample.num_batches_per_epoch=1", "train.gradient_accumulation_steps=1", "sample.num_steps=3",
        "train.checkpoint_every=0", "tracking.enabled=true", "tracking.image_every=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` as a subprocess (its own process group) that can be killed and restarted on the
    same port with the same sqlite DB and S3 bucket."""

    def __init__(self, root: Path, s3_endpoint: str):
        self.root, self.s3_endpoint = root, s3_endpoint
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        env = {**os.environ, **CREDS, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(self.uri + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("mlflow server did not become healthy")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its worker(s)
            self.proc.wait()


@pytest.fixture(scope="module")
def s3():
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    moto.stop()


@pytest.fixture(scope="module")
def server(s3, tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), s3[0])
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture
def lineage(monkeypatch):
    env = {"KFP_RUN_ID": "kfp-run-123", "KFP_PIPELINE_VERSION": "pv-7", "FLOWGRPO_GIT_SHA": "abc123def",
           "FLOWGRPO_IMAGE_DIGEST": "sha256:feedbeef"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return env


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _assert_metrics_match_jsonl(client, run_id: str, out: Path) -> None:
    recs = _records(out)
    assert recs
    for key in ("reward_mean", "reward_std", "reward_jpeg_compressibility_mean", "loss", "clipfrac", "epoch_s"):
        hist = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert hist == {r["epoch"]: pytest.approx(r[key], rel=1e-12, abs=0) for r in recs}, key
    # every numeric field of metrics.jsonl is a metric; None (kl with beta=0) is skipped
    last = recs[-1]
    logged = client.get_run(run_id).data.metrics
    numeric = {k for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= set(logged), numeric - set(logged)
    assert last["kl"] is None and "kl" not in logged


def test_training_run_logs_params_metrics_images_lineage_and_curves(server, s3, lineage, tiny_cfg, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(*FAST, "train.epochs=2", f"tracking.tracking_uri={server.uri}", "tracking.experiment=itest",
                   "tracking.run_name=tiny-itest", "model.revision=rev-1", out=out)
    run_training(cfg, resume="never")

    info = json.loads((out / RUN_FILE).read_text())
    assert info["tracking_uri"] == server.uri and info["run_url"].startswith(server.uri)
    c = _client(server.uri)
    run = c.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-itest"
    assert c.get_experiment(run.info.experiment_id).name == "itest"
    p = run.data.params
    assert p["train.epochs"] == "2" and p["model.path"] == cfg.model.path and p["sample.num_steps"] == "3"
    assert p["reward.jpeg_compressibility"] == "1.0" and p["sample.sde_window_range"] == "[0, 10]"
    assert len(p) > 50
    t = run.data.tags
    assert t["kfp.run_id"] == "kfp-run-123" and t["kfp.pipeline_version"] == "pv-7"
    assert t["git.sha"] == "abc123def" and t["image.digest"] == "sha256:feedbeef"
    assert t["base_model.id"] == cfg.model.path and t["base_model.revision"] == "rev-1"
    assert t["checkpoint_uri"] == str((out / "checkpoints").resolve()) and t["final_uri"] == str((out / "final").resolve())
    _assert_metrics_match_jsonl(c, run.info.run_id, out)

    arts = _artifacts(c, run.info.run_id)
    assert {"samples/train-00000.png", "samples/train-00000.json", "samples/train-00001.png",
            "curves/reward_kl.png", "metrics/metrics.jsonl", "config.yaml"} <= arts, arts
    assert not any("safetensors" in a for a in arts)  # weights never go through the artifact proxy
    grid = Path(c.download_artifacts(run.info.run_id, "samples/train-00001.png", str(tmp_path / "dl")))
    from PIL import Image

    assert Image.open(grid).size[0] >= 128
    caps = json.loads(Path(c.download_artifacts(run.info.run_id, "samples/train-00001.json", str(tmp_path / "dl")))
                      .read_text())
    assert len(caps["captions"]) == 8 and all(" r=" in x for x in caps["captions"])
    # the artifacts went through the server's proxy into S3
    keys = [o["Key"] for o in s3[1].list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/curves/reward_kl.png") for k in keys), keys


def test_logs_into_the_run_named_by_mlflow_run_id(server, lineage, tiny_cfg, tmp_path, monkeypatch):
    c = _client(server.uri)
    exp = c.get_experiment_by_name("kfp-plugin") or c.get_experiment(c.create_experiment("kfp-plugin"))
    existing = c.create_run(exp.experiment_id, run_name="created-by-kfp").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", existing)
    out = tmp_path / "run"
    run_training(tiny_cfg(*FAST, "train.epochs=1", f"tracking.tracking_uri={server.uri}", out=out), resume="never")
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == existing
    run = c.get_run(existing)
    assert run.info.status == "FINISHED" and run.info.run_name == "created-by-kfp"
    assert run.data.params["train.epochs"] == "1" and run.data.tags["kfp.run_id"] == "kfp-run-123"
    _assert_metrics_match_jsonl(c, existing, out)


def test_unreachable_at_start_fails_before_any_model_is_built(tiny_cfg, tmp_path, monkeypatch):
    dead = f"http://127.0.0.1:{_free_port()}"
    import flowgrpo.models

    def no_model(*a, **k):
        raise AssertionError("a model was built before the tracking check")

    monkeypatch.setattr(flowgrpo.models, "load_adapter", no_model)
    t0 = time.time()
    with pytest.raises(TrackingUnavailableError) as e:
        run_training(tiny_cfg(*FAST, f"tracking.tracking_uri={dead}"), resume="never")
    assert dead in str(e.value) and "tracking.required=false" in str(e.value)
    assert time.time() - t0 < 30  # short timeouts, no minutes of retries
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unreachable_not_required_trains_with_metrics_jsonl_only(tiny_cfg, tmp_path, caplog):
    dead = f"http://127.0.0.1:{_free_port()}"
    out = tmp_path / "run"
    run_training(tiny_cfg(*FAST, "train.epochs=1", f"tracking.tracking_uri={dead}", "tracking.required=false",
                          out=out), resume="never")
    assert [r["epoch"] for r in _records(out)] == [0]
    assert not (out / RUN_FILE).exists()
    assert any(dead in r.getMessage() and "metrics.jsonl only" in r.getMessage() for r in caplog.records)


class _KillServerAt:
    """Extra logger: kills the MLflow server when epoch ``step`` is logged and restarts it in a thread."""

    def __init__(self, server: MlflowServer, step: int):
        self.server, self.step, self.thread = server, step, None

    def log_metrics(self, metrics, step):
        if step == self.step:
            self.server.kill()
            self.thread = threading.Thread(target=self.server.start, daemon=True)
            self.thread.start()

    def log_images(self, *a, **k):
        pass

    def close(self):
        pass


def test_server_killed_mid_run_training_finishes_and_metrics_are_flushed(server, lineage, tiny_cfg, tmp_path,
                                                                         monkeypatch, caplog):
    monkeypatch.setenv("FLOWGRPO_TRACKING_CLOSE_TIMEOUT", "90")
    out = tmp_path / "run"
    killer = _KillServerAt(server, step=1)
    cfg = tiny_cfg(*FAST, "train.epochs=3", f"tracking.tracking_uri={server.uri}", out=out)
    run_training(cfg, resume="never", logger=killer)  # epochs 1 and 2 are logged while the server is down
    killer.thread.join(timeout=120)
    assert server.proc.poll() is None
    assert any("unreachable" in r.getMessage() for r in caplog.records)  # the outage was noticed
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    c = _client(server.uri)
    assert c.get_run(run_id).info.status == "FINISHED"
    assert [r["epoch"] for r in _records(out)] == [0, 1, 2]
    _assert_metrics_match_jsonl(c, run_id, out)  # epochs 1 and 2 were queued and delivered later
    assert {"samples/train-00002.png", "curves/reward_kl.png"} <= _artifacts(c, run_id)


def test_dead_server_never_blocks_and_close_gives_up_at_its_deadline():
    dead = f"http://127.0.0.1:{_free_port()}"
    import numpy as np

    lg = MlflowLogger(dead, "0" * 32, timeout_s=2, close_timeout_s=1.0)
    t0 = time.time()
    for step in range(20):
        lg.log_metrics({"epoch": step, "reward_mean": 0.1 * step}, step)
        lg.log_images("train", np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"], step)
    assert time.time() - t0 < 10
    assert lg.pending == 40
    t0 = time.time()
    lg.close()
    assert time.time() - t0 < 10 and lg.pending > 0  # gave up, did not raise


def test_failed_training_ends_the_run_failed(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWGRPO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)

    from flowgrpo.recipe import GRPORecipe

    def boom(self, epoch):
        raise RuntimeError("boom")

    monkeypatch.setattr(GRPORecipe, "sample_epoch", boom)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        run_training(tiny_cfg(*FAST, "train.epochs=1", out=out), resume="never")
    info = json.loads((out / RUN_FILE).read_text())
    assert _client(info["tracking_uri"]).get_run(info["run_id"]).info.status == "FAILED"


def test_embedded_default_logs_to_sqlite_under_flowgrpo_home(tiny_cfg, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FLOWGRPO_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    out = tmp_path / "run"
    run_training(tiny_cfg(*FAST, "train.epochs=1", out=out), resume="never")
    info = json.loads((out / RUN_FILE).read_text())
    assert info["tracking_uri"] == f"sqlite:///{home.resolve() / 'mlflow.db'}" and (home / "mlflow.db").is_file()
    assert info["artifact_uri"].startswith((home.resolve() / "mlartifacts").as_uri())
    c = _client(info["tracking_uri"])
    assert c.get_run(info["run_id"]).info.status == "FINISHED"
    _assert_metrics_match_jsonl(c, info["run_id"], out)
    run_dir = home / "mlartifacts" / "flowgrpo" / info["run_id"] / "artifacts"
    assert (run_dir / "curves" / "reward_kl.png").is_file() and (run_dir / "samples" / "train-00000.png").is_file()
