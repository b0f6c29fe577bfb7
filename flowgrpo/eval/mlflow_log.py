"""Log an evaluation (:class:`~flowgrpo.eval.runner.EvalRun`) to an MLflow run.

Metrics ``<prefix>/<metric>`` (candidate), ``<prefix>_base/<metric>``, ``<prefix>_champion/<metric>`` (finite
values only; step 0), ``<prefix>/gate_passed`` and ``<prefix>/gate_delta`` when the gate was evaluated; artifacts
``<prefix>/report.html``, ``<prefix>/report.md``, ``<prefix>/metrics.json`` and the per-image records
``<prefix>/results/<role>/<suite>.jsonl``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from flowgrpo.eval.results import RESULTS_FILE


def metric_batch(run: Any, prefix: str = "eval") -> dict[str, float]:
    out: dict[str, float] = {}
    for role, metrics in run.metrics.items():
        p = prefix if role == "candidate" else f"{prefix}_{role}"
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[f"{p}/{k}"] = float(v)
    if run.passed is not None:
        out[f"{prefix}/gate_passed"] = float(bool(run.passed))
    if run.delta is not None and math.isfinite(run.delta):
        out[f"{prefix}/gate_delta"] = float(run.delta)
    return out


def log_eval_run(run: Any, run_id: str, tracking_uri: str | None = None, prefix: str = "eval",
                 records: bool = True) -> dict[str, float]:
    """Log ``run`` into the existing MLflow run ``run_id``; returns the metrics logged."""
    from mlflow.entities import Metric

    from flowgrpo.tracking import _client, resolve_tracking_uri

    client = _client(resolve_tracking_uri(tracking_uri))
    ts = int(time.time() * 1000)
    metrics = metric_batch(run, prefix)
    items = [Metric(k, v, ts, 0) for k, v in sorted(metrics.items())]
    for i in range(0, len(items), 900):  # MLflow: at most 1000 metrics per batch
        client.log_batch(run_id, metrics=items[i:i + 900])
    client.log_text(run_id, run.html, f"{prefix}/report.html")
    client.log_text(run_id, run.markdown, f"{prefix}/report.md")
    client.log_text(run_id, json.dumps(run.summary(), indent=1, sort_keys=True, default=str), f"{prefix}/metrics.json")
    if records:
        with tempfile.TemporaryDirectory(prefix="flowgrpo-eval-log-") as d:
            for role, results in run.results.items():
                for r in results:
                    src = Path(r.root) / RESULTS_FILE if r.root is not None else None
                    if src is None or not src.is_file():
                        continue
                    dst = Path(d) / role / f"{r.suite}.jsonl"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_text("".join(json.dumps(rec, sort_keys=True) + "\n" for rec in r.records))
            if any(Path(d).iterdir()):
                client.log_artifacts(run_id, d, f"{prefix}/results")
    return metrics


def start_run(tracking_uri: str | None, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """A new MLflow run in ``experiment`` (created when missing), left RUNNING; returns its id."""
    from flowgrpo.tracking import _client, check_tracking, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    exp_id = check_tracking(uri, experiment)
    return _client(uri).create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id


def end_run(run_id: str, tracking_uri: str | None = None, status: str = "FINISHED") -> None:
    from flowgrpo.tracking import _client, resolve_tracking_uri

    _client(resolve_tracking_uri(tracking_uri)).set_terminated(run_id, status)


__all__ = ["end_run", "log_eval_run", "metric_batch", "start_run"]
