"""GRPORecipe: the single Flow-GRPO training loop (setup / train / cleanup), for every model family.

One epoch (DESIGN.md "Data flow"):
  1. evaluate (ODE, EMA weights) when due;
  2. sample ``num_batches_per_epoch`` batches per rank with the SDE/CPS step, recording log-probs; each
     batch's rewards are scored in a thread pool while the next batch samples;
  3. gather rewards over ranks and normalise them per group (advantages);
  4. recompute log-probs under the current policy for every trained step of every micro-batch, clipped
     surrogate + beta KL, gradient accumulation, optimizer steps;
  5. log one record to metrics.jsonl (rank 0) and checkpoint on schedule.

The same code runs as a single process, under ``torchrun`` (gloo on CPU, NCCL on GPU), in a PyTorchJob
and with DeepSpeed ZeRO through accelerate.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from flowgrpo import checkpoint as ckpt
from flowgrpo.advantages import group_advantages, keep_nonzero
from flowgrpo.config import RunConfig, save_config
from flowgrpo.distributed import draw_groups, read_env, seed_for
from flowgrpo.edit import is_edit, load_prompt_set
from flowgrpo.ema import EMA
from flowgrpo.loss import grpo_loss
from flowgrpo.metrics import JsonlLogger, MetricsLogger, MultiLogger
from flowgrpo.models.base import ModelAdapter
from flowgrpo.objectives import OFFLINE, best_of_group, dpo_loss, micro_batches, preference_pairs, sft_loss
from flowgrpo.rewards import WeightedReward
from flowgrpo.rollout import PromptEncoder, Trajectory, rollout, to_uint8
from flowgrpo.schedule import full_window, random_window
from flowgrpo.sde import kl_to_reference, stochastic_step


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible (set device=cpu or auto)")
    return torch.device(setting)


def make_accelerator(cfg: RunConfig, cpu: bool):
    """accelerate.Accelerator for this process: gloo on CPU (accelerate would otherwise see one process),
    optional DeepSpeed ZeRO. Mixed precision is handled by the adapter (autocast), not by accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    accum = cfg.train.gradient_accumulation_steps * cfg.sample.num_train_steps  # backward passes per update
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.train.deepspeed_stage > 0
    handlers = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=timedelta(minutes=60))] if distributed else []
    plugin = None
    if cfg.train.deepspeed_stage:
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": "29511"}.items():
            os.environ.setdefault(k, v)  # DeepSpeed needs a process group even for one process
        plugin = DeepSpeedPlugin(zero_stage=cfg.train.deepspeed_stage, gradient_accumulation_steps=accum,
                                 gradient_clipping=cfg.train.max_grad_norm)
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.sample.batch_size
    return Accelerator(cpu=cpu and plugin is None, gradient_accumulation_steps=accum, kwargs_handlers=handlers,
                       deepspeed_plugin=plugin, mixed_precision="no")


@dataclass
class EpochSamples:
    traj: Trajectory  # this rank's N samples
    rewards: dict[str, np.ndarray]  # name -> [N]; "avg" is the training reward
    preview: tuple[np.ndarray, list[str]]  # a few uint8 images + captions for the grid
    sample_s: float


class GRPORecipe:
    """``recipe = GRPORecipe(cfg); recipe.setup(); recipe.train(); recipe.cleanup()``."""

    def __init__(self, cfg: RunConfig, resume: str = "auto", logger: MetricsLogger | None = None):
        self.cfg = cfg
        self.resume = resume
        self.extra_logger = logger

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        env = read_env()
        cfg.check_world_size(env.world_size)  # before anything expensive
        # MLflow reachable? (rank 0, before any model is built: TrackingUnavailableError names the URI)
        from flowgrpo.tracking import preflight

        self.tracker = None
        self._tracking_ok = env.is_main and preflight(cfg)
        from flowgrpo.models.loading import ADAPTERS

        d, self.edit = cfg.data, is_edit(ADAPTERS.get(cfg.model.family))  # edit models: every row has a source image
        self.prompts = load_prompt_set(d.train_prompts, d.image_root, self.edit)
        self.test_prompts = load_prompt_set(d.test_prompts, d.image_root, self.edit) if d.test_prompts else None
        self.reward_fn = WeightedReward(cfg.reward, options=cfg.reward_options)

        device = pick_device(cfg.device)
        if device.type == "cpu" and cfg.malloc_tune:
            from flowgrpo.runtime import tune_malloc

            tune_malloc()
        self.accelerator = acc = make_accelerator(cfg, cpu=device.type == "cpu")
        self.rank, self.world = acc.process_index, acc.num_processes
        if self.world != env.world_size:
            raise RuntimeError(f"accelerate sees {self.world} processes but WORLD_SIZE={env.world_size}")
        self.is_main = acc.is_main_process
        random.seed(seed_for(cfg.seed, "python", self.rank) % 2**32)
        np.random.seed(seed_for(cfg.seed, "numpy", self.rank) % 2**32)
        torch.manual_seed(seed_for(cfg.seed, "torch", self.rank))

        from flowgrpo.models import load_adapter

        _quiet_libraries()
        m = cfg.model
        self.adapter: ModelAdapter = load_adapter(
            m.family, m.path, revision=m.revision, device=acc.device, mixed_precision=m.mixed_precision,
            max_sequence_length=m.max_sequence_length, full_finetune=not m.use_lora,
            needs_reference=cfg.train.beta > 0 or cfg.train.objective in ("dpo", "online_dpo", "sft"))
        if hasattr(self.adapter, "resolution"):  # resolution-dependent schedules (FLUX's dynamic shift)
            self.adapter.resolution = cfg.sample.resolution
        if m.num_frames:  # video families (validated in the config)
            self.adapter.num_frames = m.num_frames
        if m.use_lora:  # empty lora_targets: the family's default attention projections
            targets = {"target_modules": m.lora_targets} if m.lora_targets else {}
            self.adapter.add_lora(m.lora_rank, m.lora_alpha, **targets)
        self.params = self.adapter.trainable_parameters()
        t = cfg.train
        optimizer = torch.optim.AdamW(self.params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay, eps=t.adam_eps)
        if m.compile:  # in place, before DDP wraps it: sampling, training and evaluation all run the compiled code
            from flowgrpo.runtime import compile_module

            compile_module(self.adapter.transformer)
        self.model, self.optimizer = acc.prepare(self.adapter.transformer, optimizer)
        self.ema = EMA(self.params, t.ema_decay, t.ema_update_every) if t.ema else None

        self.encoder = PromptEncoder(self.adapter, cfg.sample.resolution)
        needs_negative = cfg.sample.cfg or cfg.eval.guidance_scale > 1
        # edit models: the negative prompt is encoded with each row's source image (see _negative)
        self.negative = self.adapter.encode_prompts([""]) if needs_negative and not self.edit else None
        self.sigmas = self.adapter.sigmas(cfg.sample.num_steps).to(acc.device)  # [T+1]
        self.executor = ThreadPoolExecutor(max_workers=t.reward_workers)

        out = Path(cfg.output_dir)
        self.jsonl = JsonlLogger(out) if self.is_main else None
        loggers = [lg for lg in (self.jsonl, self.extra_logger) if lg is not None]
        self.logger = MultiLogger(loggers) if self.is_main else None
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        self.start_epoch, self.global_step = 0, 0
        self._maybe_resume()
        if self._tracking_ok:  # after resume: a resumed training continues its MLflow run (mlflow_run.json)
            from flowgrpo.tracking import open_tracking

            self.tracker = open_tracking(cfg, resumed=self.start_epoch > 0)
            if self.tracker is not None:
                self.logger.loggers.append(self.tracker)
                self._print(f"MLflow run {self.tracker.run_id} at {self.tracker.tracking_uri}")

    def _maybe_resume(self) -> None:
        if self.resume == "never":
            return
        found = self._resume_dir()
        if found is None:
            return
        location, path = found
        state = ckpt.read_state(path)
        self.adapter.load_trainable_state_dict(load_file(str(path / "trainable.safetensors")))
        if (path / "deepspeed").is_dir():
            self.model.load_checkpoint(str(path / "deepspeed"), load_module_strict=False)
        else:
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        if self.ema is not None and (path / "ema.safetensors").is_file():
            self.ema.load_state_dict(load_file(str(path / "ema.safetensors")))
        rng_file = path / f"rng-rank{self.rank}.pt"
        if rng_file.is_file():
            ckpt.set_rng_state(torch.load(rng_file, weights_only=False))
        self.start_epoch, self.global_step = state["epoch"] + 1, state["global_step"]
        if self.jsonl is not None:
            self.jsonl.truncate_after(state["epoch"])
        self._print(f"resumed from {location} (epoch {state['epoch']}, step {self.global_step})")

    def _checkpoint_root(self):
        """``storage.checkpoint_uri`` (any storage URI) or ``<output_dir>/checkpoints``."""
        return ckpt.checkpoint_root(self.cfg.output_dir, self.cfg.storage.checkpoint_uri)

    def _resume_dir(self) -> tuple[str, Path] | None:
        """(checkpoint location, local verified directory) to resume from, or None. Rank 0 picks the checkpoint
        (the newest complete one for ``auto``; S3 ones are downloaded and hash-checked into the local cache);
        the other ranks use the same one, fetching it themselves where rank 0's copy is not visible."""
        cache = ckpt.cache_dir(self.cfg.output_dir)
        choice: list[Any] = [None, None, None]  # location, local dir, rank 0's error
        error: BaseException | None = None
        if self.is_main:
            try:
                if self.resume == "auto":
                    found = ckpt.fetch_latest(self._checkpoint_root(), cache)
                else:
                    found = (self.resume, ckpt.fetch(self.resume, cache))
                if found is not None:
                    choice[:2] = str(found[0]), str(found[1])
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
                error, choice[2] = e, f"{type(e).__name__}: {e}"
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            choice = broadcast_object_list(choice, from_process=0)
        if error is not None:
            raise error
        if choice[2] is not None:
            raise RuntimeError(f"rank 0 could not resolve the checkpoint to resume from: {choice[2]}")
        if choice[0] is None:
            return None
        local = Path(choice[1])
        if not self.is_main and not (local / ckpt.STATE).is_file():  # a node without rank 0's file system
            local = ckpt.fetch(choice[0], cache)
        return choice[0], local

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        last: dict[str, Any] = {}
        for epoch in range(self.start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            record: dict[str, Any] = {"epoch": epoch}
            if cfg.eval.every and epoch % cfg.eval.every == 0 and self.test_prompts is not None:
                record.update(self.evaluate(epoch))
            samples = self.sample_epoch(epoch)
            adv, adv_stats = self.compute_advantages(samples)
            record.update(adv_stats)
            t1 = time.perf_counter()
            record.update(self.train_epoch(epoch, samples.traj, adv, samples.rewards["avg"]))
            train_s = time.perf_counter() - t1
            n_images = len(samples.traj) * self.world
            record.update(global_step=self.global_step, images_per_s=n_images / samples.sample_s,
                          sample_s=samples.sample_s, train_s=train_s, epoch_s=time.perf_counter() - t0)
            if self.is_main:
                self.logger.log_metrics(record, step=epoch)
                if epoch % cfg.tracking.image_every == 0 or epoch == cfg.train.epochs - 1:
                    self.logger.log_images("train", samples.preview[0], samples.preview[1], step=epoch)
                extra = (f"kl {record['kl']} clipfrac {record['clipfrac']:.3f}" if "clipfrac" in record
                         else f"{cfg.train.objective} loss {record.get('loss', float('nan')):.4f}")
                self._print(f"epoch {epoch}: reward {record['reward_mean']:.4f} ± {record['reward_std']:.4f} "
                            f"{extra} {record['epoch_s']:.1f}s")
            every = cfg.train.checkpoint_every
            if (every and (epoch + 1) % every == 0) or epoch == cfg.train.epochs - 1:
                self.save_checkpoint(epoch)
            last = record
        if cfg.eval.every and self.test_prompts is not None and cfg.train.epochs > self.start_epoch:
            final_eval = self.evaluate(cfg.train.epochs)
            if self.is_main:
                self.logger.log_metrics({"epoch": cfg.train.epochs, "final": True, **final_eval}, step=cfg.train.epochs)
            last = {**last, **final_eval}
        self.export_final()
        if self.is_main and self.jsonl is not None and self.jsonl.path.exists():
            import json

            recs = [json.loads(ln) for ln in self.jsonl.path.read_text().splitlines() if ln.strip()]
            rewards = [r["reward_mean"] for r in recs if "reward_mean" in r]
            if rewards:
                self._print(f"done: reward_mean {rewards[0]:.5f} -> {rewards[-1]:.5f} over {len(rewards)} epochs; "
                            f"final model in {Path(cfg.output_dir) / 'final'}")
        return last

    # -------------------------------------------------------------------------------------- sampling
    def sample_epoch(self, epoch: int) -> EpochSamples:
        cfg, s = self.cfg, self.cfg.sample
        self.model.eval()
        self.encoder.clear()
        trajs, futures = [], []
        preview: tuple[np.ndarray, list[str]] = (np.zeros((0, 1, 1, 3), np.uint8), [])
        t0 = time.perf_counter()
        bar = tqdm(range(s.num_batches_per_epoch), desc=f"epoch {epoch} sample", disable=not self.is_main, leave=False)
        for b in bar:
            it = epoch * s.num_batches_per_epoch + b
            draw = draw_groups(len(self.prompts), self.world, self.rank, s.batch_size, s.group_size, cfg.seed, it)
            prompts = [self.prompts.prompts[i] for i in draw.prompt_index.tolist()]
            meta = [self.prompts.metadata[i] for i in draw.prompt_index.tolist()]
            cond = self.encoder(prompts, meta)
            if s.sde_window_size:
                rng = random.Random(seed_for(cfg.seed, "window", it, self.rank))
                window = random_window(s.num_steps, s.sde_window_size, *s.sde_window_range, rng)
            else:
                window = full_window(s.num_steps, s.timestep_fraction)
            init_seeds = [seed_for(cfg.seed, "init", it, p) for p in prompts] if s.same_latent else None
            negative = self._negative(meta, self.encoder, s.guidance_scale)
            with self._sampling_policy():
                images, lat, lps, means = rollout(
                    self.adapter, cond, negative, sigmas=self.sigmas, window=window,
                    guidance_scale=s.guidance_scale, noise_level=s.noise_level, sde_type=s.sde_type,
                    sample_seeds=draw.sample_seed.tolist(), init_seeds=init_seeds, resolution=s.resolution,
                    record_means=cfg.train.guard)
            steps = torch.arange(window.train_start, window.train_end, device=lat.device)
            trajs.append(Trajectory(prompts, meta, draw.group_id, cond, lat, lps, means,
                                    steps.expand(len(prompts), -1), images.new_zeros(0)))
            u8 = to_uint8(images)
            futures.append(self.executor.submit(self.reward_fn, u8, prompts, meta))
            if b == s.num_batches_per_epoch - 1:
                preview = (u8[:8], prompts[:8])
        rewards_per_batch = [f.result() for f in futures]
        sample_s = time.perf_counter() - t0
        rewards = {k: np.concatenate([r[k] for r in rewards_per_batch]) for k in rewards_per_batch[0]}
        captions = [f"{p[:40]} r={r:.3f}" for p, r in zip(preview[1], rewards["avg"][-len(preview[1]):])]
        return EpochSamples(Trajectory.concat(trajs), rewards, (preview[0], captions), sample_s)

    def compute_advantages(self, samples: EpochSamples) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg, acc = self.cfg, self.accelerator
        n = len(samples.traj)
        stats: dict[str, Any] = {}
        for name, values in samples.rewards.items():
            allv = acc.gather(torch.as_tensor(values, dtype=torch.float64, device=acc.device)).cpu()
            key = "reward" if name == "avg" else f"reward_{name}"
            stats[f"{key}_mean"] = float(allv.mean())
            if name == "avg":
                stats["reward_std"] = float(allv.std(unbiased=False))
                all_rewards = allv
        grouped = cfg.train.per_prompt_stat_tracking and cfg.sample.group_size > 1
        gids = samples.traj.group_ids if grouped else torch.zeros(n, dtype=torch.long)
        all_gids = acc.gather(gids.to(acc.device)).cpu()
        adv_all, st = group_advantages(all_rewards, all_gids, global_std=cfg.train.global_std)
        adv = adv_all.reshape(self.world, n)[self.rank]  # gather is rank-major
        if cfg.train.objective in ("sft", "online_sft"):  # best-of-group needs each group's extrema over ranks
            mine = all_gids.reshape(self.world, n)[self.rank]
            hi = {g: float(all_rewards[all_gids == g].max()) for g in torch.unique(mine).tolist()}
            lo = {g: float(all_rewards[all_gids == g].min()) for g in hi}
            self._group_extrema = (torch.tensor([hi[g] for g in mine.tolist()], dtype=torch.float64),
                                   torch.tensor([lo[g] for g in mine.tolist()], dtype=torch.float64))
        stats.update(zero_std_ratio=st.zero_std_ratio, reward_std_in_group=st.reward_std_mean,
                     group_size=st.group_size_mean, num_groups=st.num_groups)
        return adv, stats

    # -------------------------------------------------------------------------------------- training
    def train_epoch(self, epoch: int, traj: Trajectory, adv: torch.Tensor,
                    rewards: np.ndarray | None = None) -> dict[str, Any]:
        """One pass of updates over the epoch's samples with ``train.objective``; returns mean stats."""
        cfg, t = self.cfg, self.cfg.train
        nb = cfg.sample.num_batches_per_epoch
        self.model.train()
        if t.objective == "grpo":
            def batches(gen: torch.Generator):
                keep = keep_nonzero(adv, nb, gen) if t.filter_zero_std else torch.arange(len(traj))
                if t.shuffle:
                    keep = keep[torch.randperm(keep.numel(), generator=gen)]
                for mb_index in keep.chunk(nb):
                    yield mb_index.numel(), traj.select(mb_index), adv[mb_index].to(self.accelerator.device)
            out = self._update_loop(epoch, batches, lambda mb, extra, k: self.step_loss(mb, extra, k))
            if not (t.beta > 0):
                out["kl"] = None  # the reference forward is skipped when beta == 0
            return out
        r = torch.as_tensor(np.asarray(rewards), dtype=torch.float64)
        if t.objective in ("dpo", "online_dpo"):
            w, lose = preference_pairs(r, traj.group_ids)
            rows = torch.stack([w, lose], dim=1)  # [P, 2]
        else:
            rows = best_of_group(r, *self._group_extrema)[:, None]  # [M, 1]
        weight = 1.0
        if len(rows) == 0:  # nothing to prefer on this rank: same number of (zero-gradient) passes as the others
            rows, weight = torch.zeros((1, rows.shape[1]), dtype=torch.long), 0.0

        def batches(gen: torch.Generator):
            order = torch.randperm(len(rows), generator=gen) if t.shuffle else torch.arange(len(rows))
            for chunk in micro_batches(len(rows), nb):
                sel = rows[order[chunk]]  # [m, 1 or 2]
                yield sel.numel(), traj.select(sel.T.reshape(-1)), weight  # winners first, then losers

        out = self._update_loop(epoch, batches, self.preference_step_loss)
        out["pairs" if rows.shape[1] == 2 else "sft_targets"] = int(len(rows) if weight else 0)
        return out

    def _update_loop(self, epoch: int, batches, loss_fn) -> dict[str, Any]:
        """Backward + (accumulated) optimizer steps over ``batches(gen)`` -> (n samples, micro-batch, extra) for
        every trained step k; returns stats averaged over micro-batches x steps, then over ranks."""
        cfg, acc, t = self.cfg, self.accelerator, self.cfg.train
        sums: dict[str, float] = {}
        count, trained = 0, 0
        for inner in range(t.num_inner_epochs):
            gen = torch.Generator().manual_seed(seed_for(cfg.seed, "train", epoch, inner, self.rank))
            bar = tqdm(list(batches(gen)), desc=f"epoch {epoch} train", disable=not self.is_main, leave=False)
            for n, mb, extra in bar:
                trained += n
                for k in range(mb.log_probs.shape[1]):
                    with acc.accumulate(self.model):
                        loss, stats = loss_fn(mb, extra, k)
                        acc.backward(loss)
                        if acc.sync_gradients and acc.distributed_type.value != "DEEPSPEED":
                            acc.clip_grad_norm_(self.params, t.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    if acc.sync_gradients:
                        self.global_step += 1
                        if self.ema is not None:
                            self.ema.step(self.global_step)
                    for key, v in stats.items():
                        sums[key] = sums.get(key, 0.0) + float(v)
                    count += 1
        keys = sorted(sums)
        local = torch.tensor([sums[k] / max(count, 1) for k in keys], dtype=torch.float64, device=acc.device)
        mean = acc.reduce(local, reduction="mean").cpu().tolist()
        out = dict(zip(keys, mean))
        out["trained_samples"] = trained
        return out

    def _transition(self, mb: Trajectory, k: int, reference: bool = False):
        """The SDE/CPS step of recorded transition k under the policy (with grad) or the reference (no grad)."""
        s = self.cfg.sample
        x, x_next = mb.latents[:, k], mb.latents[:, k + 1]  # [M, C, H, W]
        idx = mb.step_index[:, k]  # [M]
        sig, sig_next = self.sigmas[idx], self.sigmas[idx + 1]  # [M]
        neg = self._negative(mb.metadata, self.encoder, s.guidance_scale)
        if reference:
            with torch.no_grad(), self.adapter.reference():
                v = self.adapter.velocity(x, sig, mb.cond, s.guidance_scale, neg)
        else:
            v = self.adapter.velocity(x, sig, mb.cond, s.guidance_scale, neg, model=self.model)
        return stochastic_step(s.sde_type, x, v, sig, sig_next, s.noise_level, self.sigmas[1], prev_sample=x_next)

    def preference_step_loss(self, mb: Trajectory, weight: float, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO on [winners; losers] rows, or SFT on best-of-group rows, at trained step k (see objectives)."""
        t = self.cfg.train
        out = self._transition(mb, k)
        if t.objective in ("dpo", "online_dpo"):
            ref = self._transition(mb, k, reference=True)
            m = len(mb) // 2
            loss, stats = dpo_loss(out.log_prob[:m], out.log_prob[m:], ref.log_prob[:m], ref.log_prob[m:], t.dpo_beta)
        else:
            loss, stats = sft_loss(out.log_prob)
        return loss * weight, stats

    @contextmanager
    def _sampling_policy(self):
        """Offline objectives (dpo, sft) sample from the reference policy; the others from the current one."""
        if self.cfg.train.objective in OFFLINE:
            with torch.no_grad(), self.adapter.reference():
                yield
        else:
            yield

    def step_loss(self, mb: Trajectory, adv: torch.Tensor, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Recompute trained step k of a micro-batch under the current policy and return its loss."""
        t = self.cfg.train
        out = self._transition(mb, k)
        kl = None
        if t.beta > 0:
            ref = self._transition(mb, k, reference=True)
            kl = kl_to_reference(out.mean, ref.mean, out.std if t.kl_uses_dt else out.std_dev_t)
        sig, sig_next = self.sigmas[mb.step_index[:, k]], self.sigmas[mb.step_index[:, k] + 1]
        return grpo_loss(
            out.log_prob, mb.log_probs[:, k], adv, t.clip_range, t.adv_clip_max, beta=t.beta, kl=kl,
            guard=t.guard, mean=out.mean, old_mean=None if mb.means is None else mb.means[:, k],
            std=out.std, dt=sig_next - sig)

    def _negative(self, metadata: list[dict], encoder: PromptEncoder, guidance_scale: float):
        """Negative-prompt rows for a batch sampled at ``guidance_scale``: the empty prompt, broadcast; for edit models
        the empty prompt with each row's source image (through ``encoder``'s cache: once per source). None without
        CFG (guidance <= 1, or distilled guidance such as FLUX's: ``adapter.needs_negative`` False)."""
        if guidance_scale <= 1 or not getattr(self.adapter, "needs_negative", True):
            return None
        if self.edit:
            return encoder([""] * len(metadata), metadata)
        if self.negative is None:
            return None
        from flowgrpo.models.base import expand

        return expand(self.negative, len(metadata))

    # -------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Deterministic ODE sampling on held-out prompts (EMA weights), fixed seeds; rank-sharded."""
        from accelerate.utils import gather_object

        cfg, e = self.cfg, self.cfg.eval
        self.model.eval()
        ps = self.test_prompts
        n = len(ps) if not e.num_prompts else min(e.num_prompts, len(ps))
        mine = list(range(self.rank, n, self.world))
        sigmas = self.adapter.sigmas(e.num_steps).to(self.accelerator.device)
        scores: list[dict[str, float]] = []
        grid_images, grid_caps = [], []
        ctx = self.ema.swapped() if self.ema is not None else _null()
        encoder = PromptEncoder(self.adapter, cfg.sample.resolution)
        with ctx:
            for start in tqdm(range(0, len(mine), e.batch_size), desc="eval", disable=not self.is_main, leave=False):
                idx = mine[start : start + e.batch_size]
                prompts = [ps.prompts[i] for i in idx]
                meta = [ps.metadata[i] for i in idx]
                encoder.clear()
                cond = encoder(prompts, meta)
                negative = self._negative(meta, encoder, e.guidance_scale)
                images, *_ = rollout(self.adapter, cond, negative, sigmas=sigmas, window=None,
                                     guidance_scale=e.guidance_scale, noise_level=0.0, sde_type="sde",
                                     sample_seeds=[seed_for(cfg.seed, "eval", i) for i in idx],
                                     resolution=cfg.sample.resolution)
                u8 = to_uint8(images)
                r = self.reward_fn(u8, prompts, meta)
                for j in range(len(idx)):
                    scores.append({name: float(v[j]) for name, v in r.items()})
                if len(grid_images) < 16:
                    grid_images.extend(u8[: 16 - len(grid_images)])
                    grid_caps.extend(f"{p[:40]} r={a:.3f}" for p, a in zip(prompts, r["avg"]))
        all_scores = gather_object(scores)
        out = {}
        for name in all_scores[0] if all_scores else []:
            key = "eval_reward" if name == "avg" else f"eval_reward_{name}"
            out[key] = float(np.mean([sc[name] for sc in all_scores]))
        if self.is_main and grid_images:
            self.logger.log_images("eval", np.stack(grid_images), grid_caps[: len(grid_images)], step=epoch)
        return out

    # -------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, epoch: int) -> Path | str | None:
        """Every rank writes its part into a local staging dir; rank 0 publishes it as ``<root>/step-N``
        (manifest, ``_COMPLETE`` marker last; a rename for local roots, an upload for S3) and prunes."""
        acc, root = self.accelerator, self._checkpoint_root()
        tmp = ckpt.staging_dir(self.cfg.output_dir, root, self.global_step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        deepspeed = acc.distributed_type.value == "DEEPSPEED"
        if deepspeed:
            self.model.save_checkpoint(str(tmp / "deepspeed"))  # collective: every rank writes its shard
        torch.save(ckpt.rng_state(), tmp / f"rng-rank{self.rank}.pt")
        if self.is_main:
            save_file(self.adapter.trainable_state_dict(), str(tmp / "trainable.safetensors"))
            if self.ema is not None:
                save_file(self.ema.state_dict(), str(tmp / "ema.safetensors"))
            if not deepspeed:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            save_config(self.cfg, tmp / "config.yaml")
        acc.wait_for_everyone()
        path = None
        if self.is_main:
            path = ckpt.publish(tmp, root, self.global_step, {"epoch": epoch, "global_step": self.global_step},
                                self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    def export_final(self) -> None:
        """``<output_dir>/final``: a diffusers-format pipeline with the (EMA) trained weights merged; also
        published (manifest, ``_COMPLETE`` marker last) at ``storage.final_uri`` when that is set."""
        if self.is_main:
            final = Path(self.cfg.output_dir) / "final"
            ctx = self.ema.swapped() if self.ema is not None else _null()
            with ctx:
                self.adapter.save_pretrained(str(final))
            if self.cfg.storage.final_uri:
                from flowgrpo import storage

                storage.publish_dir(final, self.cfg.storage.final_uri)
                self._print(f"published the final model to {self.cfg.storage.final_uri}")
        self.accelerator.wait_for_everyone()

    # -------------------------------------------------------------------------------------- misc
    def _print(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(f"[flowgrpo] {msg}")

    def cleanup(self, status: str = "FINISHED") -> None:
        """``status``: how the run ended (FINISHED / FAILED / KILLED), passed to the MLflow run."""
        self.executor.shutdown(wait=True)
        if self.logger is not None:
            from flowgrpo.tracking import close_logger

            close_logger(self.logger, status)
        self.accelerator.end_training()


def _quiet_libraries() -> None:
    """diffusers/transformers warn on every truncated prompt and on every tiny-model load; keep errors."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - older hub versions
        pass


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_training(cfg: RunConfig, resume: str = "auto", logger: MetricsLogger | None = None) -> dict[str, Any]:
    recipe = GRPORecipe(cfg, resume=resume, logger=logger)
    recipe.setup()
    status = "FAILED"
    try:
        result = recipe.train()
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        recipe.cleanup(status=status)
