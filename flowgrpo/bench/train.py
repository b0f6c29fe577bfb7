"""``flowgrpo bench train``: seconds and MFU of one Flow-GRPO training timestep, and of a whole update.

Set-up (untimed): the adapter (LoRA rank 32 / alpha 64 on the SD3 attention projections, or the whole transformer
with ``full``), one recorded rollout of ``batch`` prompts over the full SDE window (noise 0.7, 'sde'), random
advantages, AdamW with the recipe's defaults. The micro-batch is the whole sampled batch, as in the recipe.

One training timestep is what ``GRPORecipe.train_epoch`` does per (micro-batch, trained step): the recipe's own
``step_loss`` (velocity with grad - one transformer call on 2B rows with CFG -, ``stochastic_step`` with
``prev_sample``, ``grpo_loss``), ``backward``, grad-norm clipping, ``optimizer.step`` and ``zero_grad``. The KL
reference forward is off (beta = 0; ``--beta`` if the CLI grows one).

Reported: ``s_per_train_step`` (median of ``repeats`` single steps), its FLOPs (forward + backward, counted once
with FlopCounterMode) and MFU against the measured matmul peak, ``s_per_epoch_update`` (the measured loop over the
trained steps: int(0.99 T) = 9 for T = 10, or ``window``), and with ``window > 0`` the measured full-update loop
too and ``fast_speedup`` = full / window update time.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from flowgrpo.bench.common import CallCounter, CpuMonitor, Usage, bench_prompts, environment, median, peak_rss_mb
from flowgrpo.bench.flops import count_flops, measure_matmul_peak
from flowgrpo.bench.rollout import _peak_kwargs, check_finite
from flowgrpo.bench.setup import apply_speedups, eager, load_bench_adapter

LORA_RANK, LORA_ALPHA = 32, 64
NOISE_LEVEL = 0.7


def _make_recipe(args: Any, adapter: Any, negative: Any, beta: float):
    """A GRPORecipe holding just what ``step_loss`` reads (cfg, adapter, model, sigmas, negative)."""
    from flowgrpo.config import ModelConfig, RunConfig, SampleConfig, TrainConfig
    from flowgrpo.recipe import GRPORecipe
    from flowgrpo.rollout import PromptEncoder

    batch = int(args.batch)
    cfg = RunConfig(
        device="cpu",
        model=ModelConfig(path=str(args.model), use_lora=not getattr(args, "full", False),
                          lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA),
        sample=SampleConfig(resolution=int(args.resolution), num_steps=int(args.steps),
                            guidance_scale=float(args.guidance), noise_level=NOISE_LEVEL, sde_type="sde",
                            batch_size=batch, group_size=batch, num_batches_per_epoch=2),
        train=TrainConfig(beta=beta),
    )
    recipe = GRPORecipe(cfg)
    recipe.adapter = adapter
    recipe.model = adapter.transformer
    recipe.sigmas = adapter.sigmas(cfg.sample.num_steps)
    recipe.negative = negative
    recipe.edit = False  # text-to-image: the negative prompt is the one encoded above
    recipe.encoder = PromptEncoder(adapter)
    return recipe


def bench_train(args: Any) -> dict[str, Any]:
    from flowgrpo.models.sd3 import SD3_LORA_TARGETS
    from flowgrpo.rollout import PromptEncoder, Trajectory, rollout
    from flowgrpo.schedule import full_window

    full = bool(getattr(args, "full", False))
    beta = float(getattr(args, "beta", 0.0) or 0.0)
    batch, steps, res, guidance = int(args.batch), int(args.steps), int(args.resolution), float(args.guidance)
    window_size = int(args.window)
    repeats = max(1, int(args.repeats))
    if window_size < 0:
        raise ValueError(f"--window {window_size}: must be >= 0")

    adapter = load_bench_adapter(args, full_finetune=full, needs_reference=full and beta > 0)
    if not full:
        adapter.add_lora(LORA_RANK, LORA_ALPHA, SD3_LORA_TARGETS)
    speedups = apply_speedups(adapter, args)
    peak0 = measure_matmul_peak(**_peak_kwargs(args))
    cfg_on = guidance > 1.0
    prompts = bench_prompts(batch)
    negative = adapter.encode_prompts([""]) if cfg_on else None
    recipe = _make_recipe(args, adapter, negative, beta)
    t = recipe.cfg.train

    # one recorded rollout (the full window records int(0.99 T) transitions; a Fast window's steps cost the same)
    window = full_window(steps, recipe.cfg.sample.timestep_fraction)
    cond = PromptEncoder(adapter)(prompts)
    adapter.transformer.eval()
    t0 = time.perf_counter()
    with eager(adapter):  # (the recipe's compiled sampling graph is the rollout bench's business)
        _, lat, lps, means = rollout(adapter, cond, negative, sigmas=recipe.sigmas, window=window,
                                     guidance_scale=guidance, noise_level=NOISE_LEVEL, sde_type="sde",
                                     sample_seeds=list(range(batch)), resolution=res, decode=False)
    rollout_s = time.perf_counter() - t0
    steps_idx = torch.arange(window.train_start, window.train_end)
    traj = Trajectory(prompts, [{} for _ in prompts], torch.zeros(batch, dtype=torch.long), cond, lat, lps, means,
                      steps_idx.expand(batch, -1), torch.zeros(0))
    k_full = traj.log_probs.shape[1]
    if window_size > k_full:
        raise ValueError(f"--window {window_size}: at most the {k_full} trained steps of a {steps}-step rollout")
    adv = torch.randn(batch, generator=torch.Generator().manual_seed(0))

    params = adapter.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                            weight_decay=t.weight_decay, eps=t.adam_eps)
    adapter.transformer.train()

    def train_step(k: int) -> None:
        loss, _ = recipe.step_loss(traj, adv, k)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def update(ks: list[int]) -> float:
        t0 = time.perf_counter()
        for k in ks:
            train_step(k)
        return time.perf_counter() - t0

    full_ks = list(range(k_full))
    # a Fast window: `window_size` consecutive trained steps (here from the middle of the recorded ones)
    start = max(0, (k_full - window_size) // 2)
    window_ks = full_ks[start : start + window_size] if window_size > 0 else full_ks

    t0 = time.perf_counter()
    train_step(0)  # warm-up (allocations, AdamW state, compilation with --compile)
    first_step_s = time.perf_counter() - t0
    with eager(adapter) as net:  # FLOPs and calls are counted on the eager code
        with CallCounter(net) as calls:
            _, flops = count_flops(train_step, 0)
        with torch.no_grad():
            _, fwd_flops = count_flops(recipe.step_loss, traj, adv, 0)

    use = Usage()
    single: list[float] = []
    with CpuMonitor() as mon:
        for r in range(repeats):
            with use:
                single.append(update([full_ks[r % k_full]]))
        updates = [update(window_ks) for _ in range(repeats)]
        full_updates = [update(full_ks) for _ in range(repeats)] if window_size > 0 else updates

    peak = max(peak0, measure_matmul_peak(**_peak_kwargs(args)))  # best of before/after (see rollout.py)
    s_step = median(single)
    out: dict[str, Any] = {
        "bench": "train",
        "model": args.model,
        "batch": batch,
        "steps": steps,
        "resolution": res,
        "guidance": guidance,
        "window": window_size,
        "repeats": repeats,
        "finetune": "full" if full else f"lora_r{LORA_RANK}_a{LORA_ALPHA}",
        "trainable_params": sum(p.numel() for p in params),
        "beta": beta,
        "s_per_train_step": round(s_step, 4),
        "flops_per_train_step": flops,
        "forward_flops_per_train_step": fwd_flops,
        "achieved_flops": round(flops / s_step),
        "matmul_peak_flops": round(peak),
        "mfu": round(flops / s_step / peak, 4),
        "transformer_calls_per_train_step": calls.calls,
        "transformer_rows_per_call": max(calls.rows) if calls.rows else 0,
        "trained_steps": len(window_ks),
        "s_per_epoch_update": round(median(updates), 4),
        "s_per_epoch_update_est": round(len(window_ks) * s_step, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rollout_s": round(rollout_s, 3),
        "first_step_s": round(first_step_s, 3),
        "compile_s": round(max(0.0, first_step_s - s_step), 3) if speedups.get("compile") else None,
        "usage_per_train_step": use.per_run(),
    }
    if window_size > 0:
        out["full_trained_steps"] = k_full
        out["s_per_full_update"] = round(median(full_updates), 4)
        out["fast_speedup"] = round(median(full_updates) / median(updates), 4)
    out.update(cpu=mon.report(), env=environment(), speedups=speedups)
    check_finite(out)
    return out


__all__ = ["bench_train"]
