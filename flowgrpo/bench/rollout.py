"""``flowgrpo bench rollout``: images/s of the Flow-GRPO rollout (encode + SDE sampling + decode) vs diffusers.

What one timed run is (the same work a training epoch does per sampling batch, prompts not cached):
``PromptEncoder`` over ``batch`` distinct prompts (+ the empty negative prompt when guidance > 1), then
:func:`flowgrpo.rollout.rollout` over the full SDE window (every step stochastic, the first int(0.99 T) recorded,
noise level 0.7, 'sde'), then the VAE decode. The baseline is a plain ``StableDiffusion3Pipeline.__call__`` on the
same pipeline object (same weights, batch, steps, guidance, resolution, max_sequence_length, ``output_type="pt"``).
Runs are interleaved (ours, baseline, ours, ...) after one warm-up each, so slow drifts of the machine hit both
alike; medians are reported.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from flowgrpo.bench.common import CallCounter, CpuMonitor, Timed, bench_prompts, environment, median, peak_rss_mb
from flowgrpo.bench.flops import count_flops, measure_matmul_peak
from flowgrpo.bench.setup import apply_speedups, load_bench_adapter

NOISE_LEVEL = 0.7
SDE_TYPE = "sde"


def bench_rollout(args: Any) -> dict[str, Any]:
    from flowgrpo.rollout import PromptEncoder, rollout
    from flowgrpo.schedule import full_window

    batch, steps, res, guidance = int(args.batch), int(args.steps), int(args.resolution), float(args.guidance)
    repeats = max(1, int(args.repeats))
    with_baseline = not getattr(args, "no_baseline", False)
    adapter = load_bench_adapter(args)
    speedups = apply_speedups(adapter, args)
    peak = measure_matmul_peak()
    cfg = guidance > 1.0
    prompts = bench_prompts(batch)
    sigmas = adapter.sigmas(steps)
    window = full_window(steps)
    encoder = PromptEncoder(adapter)
    decode = Timed(adapter.decode)
    adapter.decode = decode  # instance attribute: rollout() calls adapter.decode(x)

    def ours(seed0: int) -> tuple[torch.Tensor, dict[str, float]]:
        t0 = time.perf_counter()
        encoder.clear()  # a new epoch: every prompt is encoded again
        cond = encoder(prompts)
        negative = adapter.encode_prompts([""]) if cfg else None
        t1 = time.perf_counter()
        dec0 = decode.seconds
        images, latents, log_probs, _ = rollout(
            adapter, cond, negative, sigmas=sigmas, window=window, guidance_scale=guidance,
            noise_level=NOISE_LEVEL, sde_type=SDE_TYPE, sample_seeds=[seed0 + i for i in range(batch)],
            resolution=res)
        t2 = time.perf_counter()
        return images, {"encode": t1 - t0, "sample": t2 - t1 - (decode.seconds - dec0),
                        "decode": decode.seconds - dec0, "total": t2 - t0}

    pipe = adapter.pipe
    pipe.set_progress_bar_config(disable=True)

    def baseline(seed0: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed0)
        return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=res, width=res,
                    max_sequence_length=adapter.max_sequence_length, output_type="pt", generator=gen).images

    try:
        # warm-up, call counting and FLOP counting (untimed)
        t_first = time.perf_counter()
        ours(10_000)
        first_run_s = time.perf_counter() - t_first
        with CallCounter(adapter.transformer) as calls:
            (images, _), flops = count_flops(ours, 20_000)
        tr_flops = steps * _velocity_flops(adapter, encoder(prompts), prompts, guidance, res)
        if with_baseline:
            baseline(1)
            with CallCounter(adapter.transformer) as base_calls:
                _, base_flops = count_flops(baseline, 2)

        # timed, interleaved
        runs: list[dict[str, float]] = []
        base_s: list[float] = []
        with CpuMonitor() as mon, CallCounter(adapter.transformer) as timer:
            for r in range(repeats):
                before = timer.seconds
                _, ph = ours(30_000 + 1000 * r)
                ph["transformer"] = timer.seconds - before
                runs.append(ph)
                if with_baseline:
                    t0 = time.perf_counter()
                    baseline(3 + r)
                    base_s.append(time.perf_counter() - t0)
                    timer.seconds = before + ph["transformer"]  # don't attribute baseline time to our phases
    finally:
        del adapter.decode

    total = median([r["total"] for r in runs])
    ips = batch / total
    fpi = flops / batch
    out: dict[str, Any] = {
        "bench": "rollout",
        "model": args.model,
        "batch": batch,
        "steps": steps,
        "resolution": res,
        "guidance": guidance,
        "repeats": repeats,
        "images_per_s": round(ips, 4),
        "s_per_image": round(total / batch, 5),
        "s_per_batch": round(total, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "flops_per_image": fpi,
        "achieved_flops": round(fpi * ips),
        "matmul_peak_flops": round(peak),
        "mfu": round(fpi * ips / peak, 4),
        "transformer_calls_per_step": calls.calls / steps,
        "transformer_rows_per_call": max(calls.rows) if calls.rows else 0,
        "phases_s": {
            "encode": round(median([r["encode"] for r in runs]), 4),
            "transformer": round(median([r["transformer"] for r in runs]), 4),
            "step_math": round(median([r["sample"] - r["transformer"] for r in runs]), 4),
            "decode": round(median([r["decode"] for r in runs]), 4),
        },
        "first_run_s": round(first_run_s, 3),
        "image_shape": list(images.shape),
    }
    tr_s = out["phases_s"]["transformer"]
    out["transformer_flops_per_image"] = tr_flops / batch
    out["transformer_mfu"] = round(tr_flops / tr_s / peak, 4) if tr_s > 0 else None
    if with_baseline:
        base = median(base_s)
        out.update(
            baseline_images_per_s=round(batch / base, 4),
            baseline_s_per_batch=round(base, 4),
            baseline_flops_per_image=base_flops / batch,
            baseline_transformer_calls_per_step=base_calls.calls / steps,
            speedup_vs_baseline=round(base / total, 4),
        )
    out.update(cpu=mon.report(), env=environment(), speedups=speedups)
    _check_finite(out)
    return out


def _velocity_flops(adapter: Any, cond: dict, prompts: list[str], guidance: float, res: int) -> int:
    """FLOPs of one ``adapter.velocity`` call (one sampling step's transformer work) on this batch."""
    x = torch.zeros(len(prompts), *adapter.latent_shape(res))
    neg = adapter.encode_prompts([""]) if guidance > 1 else None
    with torch.no_grad():
        _, flops = count_flops(adapter.velocity, x, torch.full((len(prompts),), 0.5), cond, guidance, neg)
    return flops


def _check_finite(out: dict[str, Any]) -> None:
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise RuntimeError(f"bench produced a non-finite {k}={v}")


__all__ = ["bench_rollout"]
