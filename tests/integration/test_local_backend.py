"""The local backend: real reward servers on 127.0.0.1 and a real torchrun trainer, found and stopped by run id."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from flowgrpo.backends import BackendError, RewardServerSpec, TrainingFailed, TrainJobSpec
from flowgrpo.backends.local import LocalBackend, _owned_by_run


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    t0 = time.monotonic()
    while _alive(pid) and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    return not _alive(pid)


def test_reward_servers_deploy_score_and_teardown(tmp_path):
    import json

    from flowgrpo.rewards import build_reward

    be = LocalBackend(state_dir=tmp_path)
    urls = be.deploy_rewards("run-a", [RewardServerSpec(name="jpeg-compressibility", rewards=["jpeg_compressibility"])],
                             timeout_s=120)
    assert set(urls) == {"jpeg_compressibility"} and urls["jpeg_compressibility"].startswith("http://127.0.0.1:")
    servers = json.loads((tmp_path / "run-a" / "servers.json").read_text())
    pid = servers[0]["pid"]
    assert _owned_by_run(pid, "run-a") and not _owned_by_run(pid, "run-b")

    remote = build_reward("jpeg_compressibility", url=urls["jpeg_compressibility"])
    local = build_reward("jpeg_compressibility")
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(remote(images, ["a", "b"], [{}, {}]).scores, local(images, ["a", "b"], [{}, {}]).scores)

    assert be.teardown("run-b") == []  # another run's teardown leaves this server alone
    assert _alive(pid)
    assert be.teardown("run-a") == ["reward-server/jpeg-compressibility"]
    assert _wait_gone(pid)
    assert be.teardown("run-a") == []  # twice is fine
    assert (tmp_path / "run-a.logs" / "reward-jpeg-compressibility.log").is_file()  # logs kept


def test_reward_server_that_exits_at_startup_names_itself_and_its_log(tmp_path):
    be = LocalBackend(state_dir=tmp_path)
    with pytest.raises(BackendError) as e:  # an unknown reward makes serve-reward exit 2 before it listens
        be.deploy_rewards("run-x", [RewardServerSpec(name="typo", rewards=["no_such_reward"])], timeout_s=60)
    msg = str(e.value)
    assert "'typo'" in msg and "exited during startup (exit code 2)" in msg and "http://127.0.0.1:" in msg
    assert "cannot serve reward 'no_such_reward'" in msg  # the log's tail comes with the error


def test_deploy_does_not_mistake_a_server_mid_exec_for_a_dead_one(tmp_path, monkeypatch):
    # Popen can return before the kernel has mapped the new program's environment, so /proc/<pid>/environ is
    # briefly empty (CI hit this). Startup must judge liveness by the child handle, not by the run-id check.
    import flowgrpo.backends.local as local

    monkeypatch.setattr(local, "_owned_by_run", lambda pid, run_id: False)
    be = LocalBackend(state_dir=tmp_path)
    urls = be.deploy_rewards("run-y", [RewardServerSpec(name="jpeg", rewards=["jpeg_compressibility"])], timeout_s=120)
    monkeypatch.undo()
    try:
        import requests

        assert requests.get(urls["jpeg_compressibility"] + "/readyz", timeout=5).status_code == 200
    finally:
        assert be.teardown("run-y") == ["reward-server/jpeg"]


def test_reward_server_that_never_gets_ready_names_itself(tmp_path):
    be = LocalBackend(state_dir=tmp_path)
    with pytest.raises(BackendError) as e:  # imagereward cannot load offline: /readyz stays 503
        be.deploy_rewards("run-c", [RewardServerSpec(name="imagereward", rewards=["imagereward"])], timeout_s=6)
    assert "imagereward" in str(e.value) and "http://127.0.0.1:" in str(e.value)
    be.teardown("run-c")


def test_failed_training_raises_with_the_log_tail(tmp_path):
    be = LocalBackend(state_dir=tmp_path)
    job = TrainJobSpec(name="fgrpo-fail", config_uri=str(tmp_path / "missing.yaml"), timeout_s=120)
    lines: list[str] = []
    with pytest.raises(TrainingFailed) as e:
        be.train("run-d", job, log=lines.append)
    msg = str(e.value)
    assert "fgrpo-fail failed" in msg and "missing.yaml" in msg and "last log lines" in msg
    assert any("missing.yaml" in ln for ln in lines)  # streamed while running


def test_multi_node_is_refused_locally(tmp_path):
    with pytest.raises(BackendError, match="one node"):
        LocalBackend(state_dir=tmp_path).train("run-e", TrainJobSpec(name="x", config_uri="c.yaml", nodes=2))


@pytest.mark.slow
def test_training_timeout_stops_the_process_group(tmp_path, tiny_model_dir):
    from flowgrpo.config import load_config, save_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml",
                      [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'out'}", "tracking.enabled=false",
                       "train.epochs=1000"])
    save_config(cfg, tmp_path / "cfg.yaml")
    be = LocalBackend(state_dir=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(TrainingFailed, match="timed out"):
        be.train("run-f", TrainJobSpec(name="fgrpo-slow", config_uri=str(tmp_path / "cfg.yaml"), timeout_s=8),
                 log=lambda line: None)
    assert time.monotonic() - t0 < 40
    # nothing of the run survives: no process carries its id
    time.sleep(0.5)
    left = [p for p in os.listdir("/proc") if p.isdigit() and _owned_by_run(int(p), "run-f")]
    assert left == []
