"""``flowgrpo bench eval``: throughput of the evaluation loop (:class:`flowgrpo.eval.runner.Evaluator`).

One measurement evaluates ``num_prompts`` prompts (one image each) end to end exactly as ``flowgrpo eval`` does
(batched deterministic ODE sampling, rewards, per-image JSONL + thumbnails), once with scoring overlapped with
sampling (the default) and once serially, after an untimed warm-up batch (model load, reward construction, first
calls). Reported:

* ``images_per_s``: images evaluated per second of wall time (overlapped run);
* ``sampler_images_per_s``: images per second of sampling alone (encode + ODE steps + decode);
* ``scorer_images_per_s``: images per second of scoring alone (rewards + records + thumbnails);
* ``scoring_share`` / ``sampling_share``: each one's part of sample + score time;
* ``overlap_speedup``: serial wall time / overlapped wall time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence


def bench_eval(model: str = "tiny:bench_cpu", *, num_prompts: int = 32, batch: int = 8, steps: int = 10,
               resolution: int = 128, guidance: float = 4.5, rewards: Sequence[str] = ("jpeg_compressibility", "ocr"),
               device: str = "auto", max_sequence_length: int = 32, reward_options: dict | None = None,
               serial: bool = True, threads: int = 0) -> dict[str, Any]:
    """JSON-able throughput numbers (module docstring)."""
    from flowgrpo.bench.common import CpuMonitor, bench_prompts, environment, peak_rss_mb
    from flowgrpo.eval.runner import EvalSettings, Evaluator
    from flowgrpo.eval.suites import Suite
    from flowgrpo.prompts import PromptSet

    rewards = [r for r in rewards if r]
    settings = EvalSettings(num_steps=steps, guidance_scale=guidance, resolution=resolution, batch_size=batch,
                            seed=0, device=device, max_sequence_length=max_sequence_length, thumb_size=256,
                            threads=threads)
    opts = {k: v for k, v in (reward_options or {}).items() if k in rewards}
    suite = Suite("bench", PromptSet(bench_prompts(num_prompts)), {r: 1.0 for r in rewards}, reward_options=opts)
    warm = Suite("bench", PromptSet(bench_prompts(num_prompts + batch)[num_prompts:]), suite.rewards,
                 reward_options=opts)
    ev = Evaluator(settings, cache_root="", progress=False)
    out: dict[str, Any] = {"bench": "eval", "model": model, "num_prompts": num_prompts, "batch": batch,
                           "steps": steps, "resolution": resolution, "guidance": guidance, "rewards": rewards,
                           "device": settings.device_type(), "threads": threads or None, "env": environment()}
    with tempfile.TemporaryDirectory(prefix="flowgrpo-bench-eval-") as d:
        root = Path(d)
        t0 = time.perf_counter()
        ev.evaluate(model, warm, root / "warm", use_cache=False)  # load + build + first calls, untimed
        out["warmup_s"] = round(time.perf_counter() - t0, 3)
        runs = {}
        for mode in (("overlap", "serial") if serial else ("overlap",)):
            settings.overlap = mode == "overlap"
            with CpuMonitor() as cpu:
                t0 = time.perf_counter()
                res = ev.evaluate(model, suite, root / mode, use_cache=False)
                wall = time.perf_counter() - t0
            st = res.stats
            runs[mode] = {"wall_s": round(wall, 3), "sample_s": round(st["sample_s"], 3),
                          "score_s": round(st["score_s"], 3), "images": st["sampled"],
                          "cpu": cpu.report()}
        ev.release()
    o = runs["overlap"]
    n = max(1, o["images"])
    busy = max(o["sample_s"] + o["score_s"], 1e-9)
    out.update(
        images_per_s=round(n / max(o["wall_s"], 1e-9), 3),
        sampler_images_per_s=round(n / max(o["sample_s"], 1e-9), 3),
        scorer_images_per_s=round(n / max(o["score_s"], 1e-9), 3),
        scoring_share=round(o["score_s"] / busy, 3),
        sampling_share=round(o["sample_s"] / busy, 3),
        runs=runs,
        peak_rss_mb=round(peak_rss_mb(), 1),
    )
    if "serial" in runs:
        out["overlap_speedup"] = round(runs["serial"]["wall_s"] / max(o["wall_s"], 1e-9), 3)
    return out


def run(args: Any) -> dict[str, Any]:
    """Entry point for ``flowgrpo bench eval`` (the bench CLI's namespace: ``--model --batch --steps
    --resolution --guidance --rewards --threads``; optional ``num_prompts``, ``device``, ``tiny_rewards``)."""
    rewards = [r.strip() for r in str(getattr(args, "rewards", "jpeg_compressibility,ocr")).split(",") if r.strip()]
    opts = None
    tiny = getattr(args, "tiny_rewards", None)
    if tiny:
        from flowgrpo.eval.testing import tiny_reward_options

        opts = tiny_reward_options(tiny)
    return bench_eval(str(args.model), num_prompts=int(getattr(args, "num_prompts", 0) or 4 * int(args.batch)),
                      batch=int(args.batch), steps=int(args.steps), resolution=int(args.resolution),
                      guidance=float(args.guidance), rewards=rewards, device=str(getattr(args, "device", "auto")
                                                                                   or "auto"),
                      reward_options=opts, threads=int(getattr(args, "threads", 0) or 0))


__all__ = ["bench_eval", "run"]
