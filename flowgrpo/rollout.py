"""Sampling with log-probabilities: the rollout of Flow-GRPO (paper Sec. 4.2, Algorithm 1).

One call samples a batch of B images over a T-step sigma schedule. Steps inside ``window.noise`` use the
stochastic step (SDE or CPS), the others the Euler ODE step; the transitions of steps inside
``window.train`` are recorded for the policy update.

Cost rules kept here: prompts are encoded once per unique prompt (``PromptEncoder`` caches per epoch),
each final latent is decoded once, no-CFG (guidance <= 1) is one transformer call per step.
Randomness is per image (``sample_seeds``), so an image does not depend on its batch neighbours' noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from flowgrpo.edit import SourceImages, is_edit, source_of
from flowgrpo.models.base import Conditioning, ModelAdapter, expand, select
from flowgrpo.schedule import StepWindow
from flowgrpo.sde import ode_step, stochastic_step


@dataclass
class Trajectory:
    """Recorded rollouts. B samples, K trained steps, latents [C, H, W].

    prompts      list[str] [B]
    metadata     list[dict] [B]
    group_ids    long [B]           GRPO group of each sample
    cond         Conditioning       positive prompt embeddings, rows [B] (reused by the update)
    latents      fp32 [B, K+1, C, H, W]  latents[:, k] enters trained step k, latents[:, k+1] leaves it
    log_probs    fp32 [B, K]        log p_old(latents[:, k+1] | latents[:, k]), per-element mean
    means        fp32 [B, K, C, H, W] or None   transition means (GRPO-Guard needs mu_old)
    step_index   long [B, K]        schedule index i of trained step k (sigma_i -> sigma_{i+1})
    images       fp32 [B, 3, H', W'] in [0, 1]
    """

    prompts: list[str]
    metadata: list[dict]
    group_ids: torch.Tensor
    cond: Conditioning
    latents: torch.Tensor
    log_probs: torch.Tensor
    means: torch.Tensor | None
    step_index: torch.Tensor
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: torch.Tensor) -> "Trajectory":
        """Rows ``index`` (LongTensor [M]) of every field; images are dropped (not needed for training)."""
        idx = index.tolist()
        return Trajectory(
            prompts=[self.prompts[i] for i in idx],
            metadata=[self.metadata[i] for i in idx],
            group_ids=self.group_ids[index],
            cond=select(self.cond, index),
            latents=self.latents[index],
            log_probs=self.log_probs[index],
            means=None if self.means is None else self.means[index],
            step_index=self.step_index[index],
            images=self.images[index] if self.images.numel() else self.images,
        )

    @staticmethod
    def concat(trajs: Sequence["Trajectory"]) -> "Trajectory":
        return Trajectory(
            prompts=[p for t in trajs for p in t.prompts],
            metadata=[m for t in trajs for m in t.metadata],
            group_ids=torch.cat([t.group_ids for t in trajs]),
            cond={k: torch.cat([t.cond[k] for t in trajs]) for k in trajs[0].cond},
            latents=torch.cat([t.latents for t in trajs]),
            log_probs=torch.cat([t.log_probs for t in trajs]),
            means=None if trajs[0].means is None else torch.cat([t.means for t in trajs]),
            step_index=torch.cat([t.step_index for t in trajs]),
            images=torch.cat([t.images for t in trajs]),
        )


class PromptEncoder:
    """Encodes each unique prompt once and caches the rows until :meth:`clear` (once per epoch).

    Edit adapters (``adapter.edit``, see :mod:`flowgrpo.edit`) condition on a source image too: then the cache key is
    (prompt, source image path), ``metadata`` (one row per prompt, the source under ``"image"``) is required, and
    the sources are loaded at ``resolution`` (the sample resolution) and passed as ``encode_prompts(prompts,
    images)``."""

    def __init__(self, adapter: ModelAdapter, resolution: int | None = None):
        self.adapter = adapter
        self.cache: dict[Any, Conditioning] = {}
        self.calls = 0  # prompts actually encoded (for tests / benchmarks)
        self.sources = None
        if is_edit(adapter):
            if resolution is None:
                raise ValueError(f"{type(adapter).__name__} edits a source image: PromptEncoder needs the resolution")
            self.sources = SourceImages(resolution)

    def __call__(self, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None) -> Conditioning:
        if self.sources is None:
            keys: list[Any] = list(prompts)
        else:
            if metadata is None or len(metadata) != len(prompts):
                raise ValueError(f"an edit model needs one metadata row (with the source image) per prompt; got "
                                 f"{0 if metadata is None else len(metadata)} for {len(prompts)} prompts")
            keys = [(p, source_of(md, f"metadata[{i}]")) for i, (p, md) in enumerate(zip(prompts, metadata))]
        first = {}
        for i, k in enumerate(keys):
            if k not in self.cache:
                first.setdefault(k, i)
        if first:
            new = list(first)
            if self.sources is None:
                enc = self.adapter.encode_prompts(new)
            else:
                rows = [metadata[first[k]] for k in new]
                enc = self.adapter.encode_prompts([k[0] for k in new], images=self.sources(rows))
            self.calls += len(new)
            for j, k in enumerate(new):
                self.cache[k] = {name: v[j : j + 1] for name, v in enc.items()}
        return {name: torch.cat([self.cache[k][name] for k in keys]) for name in self.cache[keys[0]]}

    def clear(self) -> None:
        self.cache.clear()


def initial_noise(shape: tuple[int, ...], seeds: Sequence[int], device: torch.device) -> torch.Tensor:
    """fp32 [B, *shape] ([B, C, H, W]; video [B, C, F, H, W]): one CPU generator per image (identical on every
    device and batch layout)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


@torch.no_grad()
def rollout(
    adapter: ModelAdapter,
    cond: Conditioning,
    negative: Conditioning | None,
    *,
    sigmas: torch.Tensor,
    window: StepWindow | None,
    guidance_scale: float,
    noise_level: float,
    sde_type: str,
    sample_seeds: Sequence[int],
    init_seeds: Sequence[int] | None = None,
    resolution: int,
    record_means: bool = False,
    decode: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sample B images. cond rows [B]; negative: one row (the empty prompt), needed when guidance > 1;
    sigmas [T+1]; window None = pure ODE (evaluation).

    Returns (images [B, 3, H', W'] or final latents if not ``decode``, latents [B, K+1, C, H, W],
    log_probs [B, K], means [B, K, C, H, W] or None). Step noise for image b at step i comes from the
    generator seeded ``sample_seeds[b]`` (drawn in step order); its initial noise from ``init_seeds[b]``
    (defaults to ``sample_seeds`` offset; equal init seeds = same_latent).
    """
    device = adapter.device
    batch = len(sample_seeds)
    shape = adapter.latent_shape(resolution)
    init = init_seeds if init_seeds is not None else [s ^ 0x5EED for s in sample_seeds]
    x = initial_noise(shape, init, device)  # [B, C, H, W]
    gens = [torch.Generator().manual_seed(int(s)) for s in sample_seeds]
    neg = expand(negative, batch) if (negative is not None and guidance_scale > 1) else None
    sigmas = sigmas.to(device)
    sigma_max = sigmas[1]
    lat, lps, means = [], [], []
    num_steps = sigmas.numel() - 1
    for i in range(num_steps):
        s = sigmas[i].expand(batch)  # [B]
        s_next = sigmas[i + 1].expand(batch)
        v = adapter.velocity(x, s, cond, guidance_scale, neg)  # [B, C, H, W] fp32
        if window is not None and window.is_stochastic(i):
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
            out = stochastic_step(sde_type, x, v, s, s_next, noise_level, sigma_max, noise=noise)
            if window.is_trained(i):
                lat.append(x)
                lps.append(out.log_prob)
                if record_means:
                    means.append(out.mean)
            x_next = out.prev_sample
        else:
            x_next = ode_step(x, v, s, s_next)
        if window is not None and window.is_trained(i) and i == window.train_end - 1:
            lat.append(x_next)
        x = x_next
    latents = torch.stack(lat, dim=1) if lat else x.new_zeros(batch, 0, *shape)  # [B, K+1, C, H, W]
    log_probs = torch.stack(lps, dim=1) if lps else x.new_zeros(batch, 0)  # [B, K]
    means_t = torch.stack(means, dim=1) if record_means and means else None
    images = adapter.decode(x) if decode else x
    return images, latents, log_probs, means_t


def to_uint8(images: torch.Tensor):
    """fp32 images [B, 3, H, W] or videos [B, F, 3, H, W] in [0, 1] -> numpy uint8 [B, H, W, 3] or [B, F, H, W, 3]
    (what rewards consume; :class:`~flowgrpo.rewards.WeightedReward` scores a video's frames)."""
    u8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return u8.movedim(-3, -1).cpu().numpy()  # channels last
