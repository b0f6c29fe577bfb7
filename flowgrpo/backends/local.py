"""``local`` backend: reward servers as subprocesses on 127.0.0.1, training under ``torchrun`` (gloo on CPU).

The same entry points as the Kubernetes backend (``flowgrpo serve-reward``, ``flowgrpo train --config``)
run as child processes. Reward servers outlive the KFP task that started them (their own session), so the
state of a run (pids, ports, logs) lives in ``<state_dir>/local-runs/<run id>/``; ``teardown`` finds them
there, and checks each pid's environment for the run id before killing it, so a recycled pid is never hit.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from flowgrpo.backends.base import BackendError, RewardServerSpec, TrainingFailed, TrainJobSpec

RUN_ID_ENV = "FLOWGRPO_RUN_ID"
LOG_TAIL_LINES = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _owned_by_run(pid: int, run_id: str) -> bool:
    """True when process ``pid`` is alive and carries ``FLOWGRPO_RUN_ID=<run_id>`` in its environment."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{RUN_ID_ENV}={run_id}".encode() in env


def _kill_group(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group of ``pid``, SIGKILL what is left after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                    return  # zombie: dead, waiting for a parent that is not us
            except (ProcessLookupError, OSError):
                return
            time.sleep(0.05)


class LocalBackend:
    name = "local"

    def __init__(self, state_dir: str | os.PathLike | None = None, python: str | None = None,
                 poll_s: float = 0.2):
        if state_dir is None:
            from flowgrpo.tracking import state_dir as default_state

            state_dir = default_state() / "local-runs"
        self.root = Path(state_dir)
        self.python = python or sys.executable
        self.poll_s = poll_s

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def _env(self, run_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, RUN_ID_ENV: run_id, "PYTHONUNBUFFERED": "1", **(extra or {})}
        return env

    # ------------------------------------------------------------------------------------ reward servers
    def deploy_rewards(self, run_id: str, specs: list[RewardServerSpec], timeout_s: float = 900) -> dict[str, str]:
        import requests

        self.teardown(run_id, servers_only=True)  # a retried task replaces what a failed try left
        d = self.run_dir(run_id)
        d.mkdir(parents=True, exist_ok=True)
        started: list[dict[str, Any]] = []
        procs: dict[str, subprocess.Popen] = {}
        for spec in specs:
            port = _free_port()
            log_path = d / f"reward-{spec.name}.log"
            cmd = [self.python, "-m", "flowgrpo.cli", "serve-reward", "--host", "127.0.0.1", "--port", str(port),
                   "--insecure-no-auth", "--log-level", "warning"]
            for r in spec.rewards:
                cmd += ["--reward", r]
            if spec.reward_options:
                cmd += ["--reward-options", json.dumps(spec.reward_options)]
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=self._env(run_id), start_new_session=True)
            procs[spec.name] = proc
            started.append({"name": spec.name, "pid": proc.pid, "port": port, "rewards": spec.rewards,
                            "url": f"http://127.0.0.1:{port}", "log": str(log_path)})
            (d / "servers.json").write_text(json.dumps(started, indent=1))
        deadline = time.monotonic() + timeout_s
        pending = {s["name"]: s for s in started}
        while pending:
            for name, s in list(pending.items()):
                # Liveness from our own child handle, not /proc/<pid>/environ: the kernel lets Popen return before
                # the new program's environment is mapped, so a freshly started server can look un-owned.
                if (rc := procs[name].poll()) is not None:
                    raise BackendError(f"reward server {name!r} ({s['url']}) exited during startup (exit code {rc}); "
                                       f"its log {s['log']}:\n{_tail(Path(s['log']))}")
                try:
                    if requests.get(s["url"] + "/readyz", timeout=2).status_code == 200:
                        del pending[name]
                except requests.RequestException:
                    pass
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{n} ({s['url']})" for n, s in pending.items())
                raise BackendError(f"reward server(s) {names} not ready after {timeout_s:g}s (GET /readyz); "
                                   f"see the logs in {d}")
            if pending:
                time.sleep(self.poll_s)
        return {r: s["url"] for s in started for r in s["rewards"]}

    # ------------------------------------------------------------------------------------ training
    def train(self, run_id: str, job: TrainJobSpec, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        if job.nodes != 1:
            raise BackendError(f"the local backend runs one node (nodes={job.nodes}); use backend=kubernetes "
                               "for multi-node training")
        log = log or (lambda line: print(line, flush=True))
        d = self.run_dir(run_id)
        d.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(job.procs_per_node), "-m", "flowgrpo.cli", *job.command()[1:]]
        env = self._env(run_id, {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(self._threads(job))),
                                 **job.env})
        log(f"[local] {' '.join(cmd)}")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, text=True, errors="replace", bufsize=1)
        (d / "train.pid").write_text(str(proc.pid))
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        previous = self._forward_sigterm(proc)
        try:
            try:
                rc = proc.wait(timeout=job.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                reader.join(timeout=5)
                raise TrainingFailed(f"training job {job.name} timed out after {job.timeout_s:g}s and was stopped",
                                     "\n".join(tail)) from None
            reader.join(timeout=10)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            (d / "train.pid").unlink(missing_ok=True)
        if rc != 0:
            raise TrainingFailed(f"training job {job.name} failed (torchrun exit code {rc})", "\n".join(tail))
        return {"job": job.name, "wall_s": time.monotonic() - t0, "exit_code": rc}

    @staticmethod
    def _threads(job: TrainJobSpec) -> int:
        return max(1, (os.cpu_count() or 1) // job.procs_per_node)

    @staticmethod
    def _forward_sigterm(proc: subprocess.Popen) -> Any:
        """Terminating the task (SIGTERM) stops the trainer's process group too (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            _kill_group(proc.pid)
            raise SystemExit(128 + signum)

        return signal.signal(signal.SIGTERM, handler)

    # ------------------------------------------------------------------------------------ teardown
    def teardown(self, run_id: str, servers_only: bool = False) -> list[str]:
        d = self.run_dir(run_id)
        done: list[str] = []
        try:
            servers = json.loads((d / "servers.json").read_text())
        except (OSError, ValueError):
            servers = []
        for s in servers:
            if _owned_by_run(s["pid"], run_id):
                _kill_group(s["pid"])
                done.append(f"reward-server/{s['name']}")
        pid_file = d / "train.pid"
        if not servers_only and pid_file.is_file():
            pid = int(pid_file.read_text() or 0)
            if pid and _owned_by_run(pid, run_id):
                _kill_group(pid)
                done.append("trainer")
        if servers_only:
            (d / "servers.json").unlink(missing_ok=True)
        elif d.is_dir():
            keep = d.parent / f"{run_id}.logs"  # logs stay for post-mortems; the state goes
            shutil.rmtree(keep, ignore_errors=True)
            d.rename(keep)
        return done
