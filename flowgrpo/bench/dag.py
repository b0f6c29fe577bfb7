"""``flowgrpo bench dag``: the local pipeline DAG's overhead on the demo (``--preset shapes_cpu``, what ``make demo``
runs; ``--preset tiny_cpu`` for the minute-long random tiny model): total wall time minus the train task's own
wall time, as a share of the total (every other task, and kfp.local's own orchestration, is overhead from the
point of view of someone waiting for a trained model). The shapes base model is built before the clock starts
(a first run would otherwise time its one-off pretraining inside the fetch task)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def run(args: Any) -> dict[str, Any]:
    from flowgrpo.pipeline import cli as pcli
    from flowgrpo.pipeline.local_run import run_local
    from flowgrpo.pipeline.params import validate_arguments

    with tempfile.TemporaryDirectory(prefix="flowgrpo-bench-dag-") as d:
        root = Path(d)
        old = os.environ.get("FLOWGRPO_HOME")
        os.environ["FLOWGRPO_HOME"] = str(root / "home")  # a fresh MLflow store: nothing cached between runs
        try:
            extra = {"gate_min_improvement": -1.0, **({"epochs": args.epochs} if args.epochs else {})}
            arguments = pcli.local_arguments(args.preset, root, extra)
            validate_arguments(arguments)
            from flowgrpo.models.loading import resolve_model_path

            resolve_model_path(arguments["base_model"])  # cached offline builds: once, outside the measurement
            res = run_local(pcli._pipeline("flow_grpo"), arguments, root / "kfp")
        finally:
            if old is None:
                os.environ.pop("FLOWGRPO_HOME", None)
            else:
                os.environ["FLOWGRPO_HOME"] = old
    tasks = {t["task"]: round(t["seconds"], 2) for t in res["tasks"]}
    return {"bench": "dag", "preset": args.preset, "base_model": arguments["base_model"], "total_s": round(res["total_s"], 2),
            "train_s": round(res["train_s"], 2), "overhead_s": round(res["total_s"] - res["train_s"], 2),
            "overhead_share": round(res["overhead_share"], 3), "target_share": 0.15, "tasks": tasks}
