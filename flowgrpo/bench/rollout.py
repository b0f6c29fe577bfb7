"""``flowgrpo bench rollout``: images/s of the Flow-GRPO rollout (encode + SDE sampling + decode) vs diffusers.

One timed run is the work a training epoch does per sampling batch, prompts not cached: ``PromptEncoder`` over
``batch`` distinct prompts (+ the empty negative prompt when guidance > 1), :func:`flowgrpo.rollout.rollout` over
the full SDE window (every step stochastic, the first int(0.99 T) recorded, noise level 0.7, 'sde'), and the VAE
decode. The baseline is a plain ``StableDiffusion3Pipeline.__call__`` on the same pipeline object (same weights,
batch, steps, guidance, resolution, max_sequence_length, ``output_type="pt"``), always on the eager transformer.
With ``--compile`` the images of one seed are compared with the eager ones (``compiled_vs_eager_max_abs_diff``,
pixels in [0, 1]).

After one untimed warm-up of each (plus one counted run for FLOPs and transformer calls), runs are interleaved
(ours, baseline, ours, ...) so slow drifts of the machine hit both alike; medians are reported. ``cpu.other_cores``
says how busy the rest of the machine was meanwhile (timings with other_cores > ~0.1 on 2 cores are disturbed).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from flowgrpo.bench.common import (CallCounter, CpuMonitor, Timed, Usage, bench_prompts, environment, median,
                                   peak_rss_mb)
from flowgrpo.bench.flops import count_flops, measure_matmul_peak
from flowgrpo.bench.setup import apply_speedups, eager, load_bench_adapter

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
    peak0 = measure_matmul_peak(**_peak_kwargs(args))
    cfg = guidance > 1.0
    prompts = bench_prompts(batch)
    sigmas = adapter.sigmas(steps)
    window = full_window(steps)
    encoder = PromptEncoder(adapter)
    decode = Timed(adapter.decode)
    velocity = Timed(adapter.velocity)  # no module hooks: a compiled transformer would trace them

    def ours(seed0: int) -> tuple[torch.Tensor, dict[str, float]]:
        t0 = time.perf_counter()
        encoder.clear()  # a new epoch: every prompt is encoded again
        cond = encoder(prompts)
        negative = adapter.encode_prompts([""]) if cfg else None
        t1 = time.perf_counter()
        dec0 = decode.seconds
        images, _, _, _ = rollout(
            adapter, cond, negative, sigmas=sigmas, window=window, guidance_scale=guidance,
            noise_level=NOISE_LEVEL, sde_type=SDE_TYPE, sample_seeds=[seed0 + i for i in range(batch)],
            resolution=res)
        t2 = time.perf_counter()
        dec = decode.seconds - dec0
        return images, {"encode": t1 - t0, "sample": t2 - t1 - dec, "decode": dec, "total": t2 - t0}

    pipe = adapter.pipe
    pipe.set_progress_bar_config(disable=True)

    def baseline(seed0: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed0)
        with eager(adapter):  # a plain diffusers pipeline: never the compiled transformer
            return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=res, width=res,
                        max_sequence_length=adapter.max_sequence_length, output_type="pt", generator=gen).images

    adapter.decode = decode  # instance attributes: rollout() calls adapter.decode(x) and adapter.velocity(...)
    try:
        t_first = time.perf_counter()
        ours(10_000)  # warm-up (and compilation with --compile)
        first_run_s = time.perf_counter() - t_first
        with eager(adapter) as net:  # FLOPs and calls, on the eager module
            with CallCounter(net) as calls:
                (images, _), flops = count_flops(ours, 20_000)
            tr_flops = steps * _velocity_flops(adapter, encoder(prompts), guidance, res)
        compiled_diff = None
        if speedups.get("compile"):  # same seeds through the compiled code: same math up to fp32 rounding
            compiled_diff = float((ours(20_000)[0] - images).abs().max())
        if with_baseline:
            baseline(1)
            with CallCounter(pipe.transformer) as base_calls:
                _, base_flops = count_flops(baseline, 2)

        runs: list[dict[str, float]] = []
        base_s: list[float] = []
        use, base_use = Usage(), Usage()
        adapter.velocity = velocity
        with CpuMonitor() as mon:
            for r in range(repeats):
                before = velocity.seconds
                with use:
                    _, ph = ours(30_000 + 1000 * r)
                ph["transformer"] = velocity.seconds - before
                runs.append(ph)
                if with_baseline:
                    t0 = time.perf_counter()
                    with base_use:
                        baseline(3 + r)
                    base_s.append(time.perf_counter() - t0)
    finally:
        del adapter.decode
        adapter.__dict__.pop("velocity", None)
    # the peak is measured before and after the timed runs and the best is kept: one measurement that another
    # process disturbed would otherwise inflate the MFU
    peak = max(peak0, measure_matmul_peak(**_peak_kwargs(args)))

    total = median([r["total"] for r in runs])
    ips = batch / total
    fpi = flops / batch
    phases = {
        "encode": median([r["encode"] for r in runs]),
        "transformer": median([r["transformer"] for r in runs]),
        "step_math": median([r["sample"] - r["transformer"] for r in runs]),
        "decode": median([r["decode"] for r in runs]),
    }
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
        "transformer_flops_per_image": tr_flops / batch,
        "transformer_mfu": round(tr_flops / phases["transformer"] / peak, 4) if phases["transformer"] > 0 else None,
        "transformer_calls_per_step": calls.calls / steps,
        "transformer_rows_per_call": max(calls.rows) if calls.rows else 0,
        "phases_s": {k: round(v, 4) for k, v in phases.items()},
        "first_run_s": round(first_run_s, 3),
        "compile_s": round(max(0.0, first_run_s - total), 3) if speedups.get("compile") else None,
        "compiled_vs_eager_max_abs_diff": compiled_diff,
        "image_shape": list(images.shape),
        "usage_per_batch": use.per_run(),
    }
    if with_baseline:
        base = median(base_s)
        out.update(
            baseline_images_per_s=round(batch / base, 4),
            baseline_s_per_batch=round(base, 4),
            baseline_flops_per_image=base_flops / batch,
            baseline_transformer_calls_per_step=base_calls.calls / steps,
            speedup_vs_baseline=round(base / total, 4),
            baseline_usage_per_batch=base_use.per_run(),
        )
    out.update(cpu=mon.report(), env=environment(), speedups=speedups)
    check_finite(out)
    return out


def _peak_kwargs(args: Any) -> dict[str, Any]:
    sizes = getattr(args, "peak_sizes", None)
    return {"sizes": tuple(sizes)} if sizes else {}


def _velocity_flops(adapter: Any, cond: dict, guidance: float, res: int) -> int:
    """FLOPs of one ``adapter.velocity`` call (one sampling step's transformer work) on this batch."""
    b = next(iter(cond.values())).shape[0]
    x = torch.zeros(b, *adapter.latent_shape(res))
    neg = adapter.encode_prompts([""]) if guidance > 1 else None
    with torch.no_grad():
        _, flops = count_flops(adapter.velocity, x, torch.full((b,), 0.5), cond, guidance, neg)
    return flops


def check_finite(out: dict[str, Any]) -> None:
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise RuntimeError(f"bench produced a non-finite {k}={v}")


__all__ = ["bench_rollout"]
