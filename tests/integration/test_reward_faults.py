"""The trainer scoring through a real reward-server process that dies: restarted within the client's retry
budget the run completes with the same rewards as in-process scoring; never restarted, the epoch fails
naming the URL, and the run resumes from its last checkpoint once the server is back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from flowgrpo.rewards.remote import RewardServerError
from flowgrpo.recipe import run_training

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-faults"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RewardServer:
    """`flowgrpo serve-reward` as a real subprocess that can be killed and restarted on the same port."""

    def __init__(self, port: int):
        self.port, self.proc = port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "FLOWGRPO_REWARD_API_KEY": KEY}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowgrpo.cli", "serve-reward", "--reward", "jpeg_compressibility", "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError("reward server did not become ready")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("FLOWGRPO_REWARD_API_KEY", KEY)
    srv = RewardServer(_free_port())
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.kill()


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _remote(url: str, budget: float) -> list[str]:
    opts = {"url": url, "retry_budget_s": budget, "max_retries": 1000, "backoff_base_s": 0.1, "backoff_max_s": 0.5,
            "connect_timeout_s": 1}
    return [f"reward_options={json.dumps({'jpeg_compressibility': opts})}"]


def _kill_after_epoch(server: RewardServer, out: Path, epoch: int, restart_after: float | None) -> threading.Thread:
    def run():
        while not (out / "metrics.jsonl").exists() or len(_records(out)) <= epoch:
            time.sleep(0.02)
        server.kill()
        if restart_after is not None:
            time.sleep(restart_after)
            server.start()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_server_restarted_within_budget_gives_the_same_run(server, tiny_cfg, tmp_path):
    out = tmp_path / "remote"
    killer = _kill_after_epoch(server, out, epoch=0, restart_after=1.0)
    run_training(tiny_cfg("train.epochs=3", *_remote(server.url, budget=60), out=out), resume="never")
    killer.join(timeout=60)
    assert not killer.is_alive()
    local = tmp_path / "local"
    run_training(tiny_cfg("train.epochs=3", out=local), resume="never")
    remote_r = [r["reward_mean"] for r in _records(out)]
    local_r = [r["reward_mean"] for r in _records(local)]
    assert remote_r == local_r  # PNG over HTTP is lossless: identical scores, identical training


def test_server_gone_fails_with_url_then_resumes(server, tiny_cfg, tmp_path):
    out = tmp_path / "run"
    overrides = ["train.epochs=4", "train.checkpoint_every=1", *_remote(server.url, budget=3)]
    killer = _kill_after_epoch(server, out, epoch=1, restart_after=None)
    with pytest.raises(RewardServerError) as e:
        run_training(tiny_cfg(*overrides), resume="never")
    killer.join(timeout=30)
    assert server.url in str(e.value)
    done = [r["epoch"] for r in _records(out)]
    assert 1 <= done[-1] < 3
    server.start()  # the server is back: the run continues from its last checkpoint
    run_training(tiny_cfg(*overrides), resume="auto")
    assert [r["epoch"] for r in _records(out)] == [0, 1, 2, 3]
