"""Run a pipeline on this machine with ``kfp.local`` (SubprocessRunner: each task is a subprocess of the
current interpreter) and report what each task took. This is ``flowgrpo pipeline run --local`` and
``make demo``: the whole DAG, with the local backend (reward servers and torchrun as subprocesses).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")


class TaskTimer:
    """Each task's wall time, from kfp.local's log lines ("Executing task 'x'" ... "Task 'x' finished with
    status S"). The runner has no timing API and swaps the root logger's handlers while it runs, so this
    hooks the log-record factory instead (installed by ``with TaskTimer():``)."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.done: list[dict[str, Any]] = []
        self._factory = None

    def observe(self, msg: str) -> None:
        msg = _ANSI.sub("", msg)
        now = time.monotonic()
        if m := _START.search(msg):
            self.started[m.group(1)] = now
        elif m := _END.search(msg):
            t0 = self.started.pop(m.group(1), None)
            if t0 is not None:
                self.done.append({"task": m.group(1), "status": m.group(2), "seconds": now - t0})

    def __enter__(self) -> "TaskTimer":
        self._factory = logging.getLogRecordFactory()
        inner = self._factory

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = inner(*args, **kwargs)
            try:
                self.observe(record.getMessage())
            except Exception:  # noqa: BLE001 - timing must never break the run
                pass
            return record

        logging.setLogRecordFactory(factory)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.setLogRecordFactory(self._factory)


def _latest_run_dir(pipeline_root: Path, name: str, since: float) -> Path | None:
    runs = [p for p in pipeline_root.glob(f"{name}-*") if p.is_dir() and p.stat().st_mtime >= since - 1]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def task_outputs(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{task name: its parameter outputs} from the executor_output.json files of a local run."""
    out = {}
    for f in sorted(run_dir.glob("*/executor_output.json")):
        data = json.loads(f.read_text() or "{}")
        entry = dict(data.get("parameterValues", {}))
        for name, arts in data.get("artifacts", {}).items():
            for art in arts.get("artifacts", []):
                entry[name] = art.get("metadata", {})
        out[f.parent.name] = entry
    return out


def run_local(pipeline_func, arguments: dict[str, Any], pipeline_root: str | Path) -> dict[str, Any]:
    """Run ``pipeline_func(**arguments)`` locally; returns the run dir, per-task timings and outputs.
    Raises RuntimeError (from kfp.local) naming the failed task when the pipeline fails."""
    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    t0, wall0 = time.monotonic(), time.time()
    error: BaseException | None = None
    with TaskTimer() as timer:
        try:
            pipeline_func(**arguments)
        except Exception as e:  # reported with the timings below, then re-raised
            error = e
    total = time.monotonic() - t0
    name = pipeline_func.name
    run_dir = _latest_run_dir(root, name, wall0)
    result = {"pipeline": name, "run_dir": str(run_dir) if run_dir else None, "total_s": total,
              "tasks": timer.done, "outputs": task_outputs(run_dir) if run_dir else {}}
    train_s = sum(t["seconds"] for t in timer.done if t["task"] == "train")
    result["train_s"] = train_s
    result["overhead_share"] = (total - train_s) / total if total > 0 else float("nan")
    if error is not None:
        result["error"] = f"{type(error).__name__}: {error}"
        raise PipelineRunFailed(result) from error
    return result


class PipelineRunFailed(RuntimeError):
    def __init__(self, result: dict[str, Any]):
        self.result = result
        super().__init__(result.get("error", "pipeline failed"))


def format_timings(result: dict[str, Any]) -> str:
    lines = [f"{'task':<28} {'status':<8} {'seconds':>8}"]
    for t in result["tasks"]:
        lines.append(f"{t['task']:<28} {t['status']:<8} {t['seconds']:8.1f}")
    lines.append(f"{'total (wall)':<28} {'':<8} {result['total_s']:8.1f}")
    lines.append(f"DAG overhead (total - train task) = {result['total_s'] - result['train_s']:.1f} s = "
                 f"{100 * result['overhead_share']:.0f}% of the wall time")
    return "\n".join(lines)
