"""Pretraining a tiny SD3 on the shapes world: an offline base model that Flow-GRPO can measurably improve.

``pretrain_shapes(out_dir)`` builds the tiny SD3 of spec ``shapes`` (:data:`flowgrpo.models.tiny.TINY_SPECS`:
a 4x-downsampling AutoencoderKL with 8 latent channels, an MM-DiT of 4 joint blocks, two small CLIP encoders and a
small T5 whose tokenizers have one token per word of the shapes vocabulary) and trains it in two stages on images
rendered by :mod:`flowgrpo.eval.shapes` from the **train split** only:

1. **VAE** - the AutoencoderKL learns to reconstruct rendered images (L1 + L2, object pixels weighted up, the
   decoder sees slightly noised latents so it tolerates imperfect ones). Trained on 32 x 32 crops (the convolutions
   are translation-equivariant; 4x cheaper than whole images). Then ``shift_factor`` / ``scaling_factor`` are set
   from the latent statistics, as SD3's VAE config does.
2. **Rectified flow** - transformer and text encoders together: ``x_s = (1 - s) x0 + s eps``, target
   ``v = eps - x0``, MSE. ``s`` is drawn the way SD3 is trained: ``u ~ logit-normal(0, 1)`` (or uniform), then
   shifted with the pipeline scheduler's own ``shift`` (``s = shift u / (1 + (shift - 1) u)``), so training covers
   exactly the sigmas :meth:`SD3Adapter.sigmas` samples with; the transformer gets ``timestep = 1000 s`` as in
   :meth:`SD3Adapter.velocity`. Captions are dropped to ``""`` with probability ``cfg_dropout`` (the empty prompt
   is what the recipe uses as the CFG negative). Prompts are encoded with the pipeline's own ``encode_prompt`` at
   ``max_sequence_length`` (16; use the same ``model.max_sequence_length`` when sampling). The saved weights are
   an EMA of the trained ones.

The step counts are deliberately small: the base model draws recognisable shapes and gets the easy prompts right
and many compositional ones (counts, relations, attribute binding) wrong, which is what Flow-GRPO then fixes.

Everything is deterministic given the settings (the seed included) and the torch thread count: step-based, one
generator per purpose; ``budget_s`` only caps the wall time (a run stopped by it is marked ``stopped_early`` in
``flowgrpo_pretrain.json`` and is not reproducible).

``cached_shapes_model(preset)`` builds once per settings under the flowgrpo cache root
(``<root>/shapes-<preset>-<hash>``: hash of the settings, the spec, :data:`PRETRAIN_CODE_VERSION`,
:data:`~flowgrpo.models.tiny.TINY_CODE_VERSION` and the shapes world's constants), under a file lock and with an
atomic rename; ``resolve_model_path("shapes")`` / ``"shapes:<preset>"`` use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from flowgrpo.models.tiny import TINY_CODE_VERSION, default_cache_root, get_spec, spec_settings

#: bump when the training code changes in a way that changes the saved model (invalidates cached models)
PRETRAIN_CODE_VERSION = 1
#: marker written last into every pretrained directory (its presence = a complete model)
PRETRAIN_MARKER = "flowgrpo_pretrain.json"
#: the tags the base model is trained on (GenEval's six)
ALL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines a pretrained shapes model (all of it is hashed into the cache key)."""

    spec: str = "shapes"
    seed: int = 0
    #: image size in pixels (a multiple of 16: VAE factor 4 x patch 2 ... see :meth:`SD3Adapter.latent_shape`)
    resolution: int = 64
    # data ----------------------------------------------------------------------------------------------------
    tags: tuple[str, ...] = ALL_TAGS
    #: the shapes-world split rule; only ``train`` scenes are ever rendered
    holdout: str = "hash"
    #: hard edges (every pixel the background or a palette colour): the VAE learns sharper edges than from
    #: anti-aliased ones, and the detector's colour segmentation is exact on them
    antialias: bool = False
    #: training layouts: "canonical" (:func:`canonical_layout`: a few fixed arrangements per object count - far
    #: less to learn in the budget), "grid" (:func:`grid_layout`) or "random" (the shapes world's own layout)
    layout: str = "canonical"
    # stage 1: VAE --------------------------------------------------------------------------------------------
    #: 2400: the detector still judges 95% (canonical layout) / 82% (random, smaller objects) of VAE round trips of
    #: 192 test scenes correct; at 1200 steps 60% / 54% (squares came back with round corners, dark green as black)
    vae_steps: int = 2400
    vae_batch_size: int = 32
    vae_crop: int = 32  # 0 = whole images
    vae_lr: float = 3e-3
    #: extra loss weight of object (non-background) pixels
    vae_object_weight: float = 9.0
    #: std of the noise added to the latents the decoder sees during VAE training (x latent std)
    vae_latent_noise: float = 0.1
    # stage 2: rectified flow ---------------------------------------------------------------------------------
    steps: int = 2400
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    #: cosine decay to this fraction of ``lr``
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    #: rendered images encoded once before the stage and cycled (0 = a fresh image every sample)
    dataset_size: int = 16384
    cfg_dropout: float = 0.1
    #: "uniform" (``u ~ U(0, 1)``: the low-noise steps that draw the shapes' edges get as much training as the
    #: layout-deciding high-noise ones) or "logit_normal" (SD3's; mostly mid-noise)
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    ema_decay: float = 0.995
    #: T5 tokens per prompt (the shapes prompts are <= 12 word tokens); sample with the same value
    max_sequence_length: int = 16
    train_text_encoders: bool = True

    def __post_init__(self) -> None:
        spec = get_spec(self.spec)
        mult = spec.vae_scale_factor * spec.patch_size
        if self.resolution % mult or self.resolution < 32:
            raise ValueError(f"resolution {self.resolution} must be >= 32 and a multiple of {mult} for spec {self.spec!r}")
        unknown = [t for t in self.tags if t not in ALL_TAGS]
        if unknown or not self.tags:
            raise ValueError(f"tags must be a non-empty subset of {ALL_TAGS}, got {self.tags}")
        if self.layout not in ("canonical", "grid", "random"):
            raise ValueError(f"layout must be 'canonical', 'grid' or 'random', got {self.layout!r}")
        if self.timestep_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"timestep_sampling must be 'logit_normal' or 'uniform', got {self.timestep_sampling!r}")
        if self.vae_crop and (self.vae_crop % spec.vae_scale_factor or self.vae_crop > self.resolution):
            raise ValueError(f"vae_crop {self.vae_crop}: a multiple of {spec.vae_scale_factor} <= resolution")
        for name in ("vae_steps", "steps", "dataset_size", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.batch_size < 1 or self.vae_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")

    def replace(self, **changes: Any) -> "PretrainSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: named settings for ``resolve_model_path("shapes:<preset>")``; "default" is what ``shapes`` means
PRESETS: dict[str, PretrainSettings] = {
    "default": PretrainSettings(),
    # the integration test's base: a couple of minutes on 2 busy cores, single objects only
    "small": PretrainSettings(tags=("single_object", "colors"), vae_steps=500, steps=700, dataset_size=4096),
}


def get_preset(name: str) -> PretrainSettings:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown shapes pretraining preset {name!r}; known: {sorted(PRESETS)}") from None


# ------------------------------------------------------------------------------------------------ cache key


def world_fingerprint() -> dict[str, Any]:
    """The shapes-world constants a pretrained model depends on (renderer, vocabulary, split)."""
    from flowgrpo.eval import shapes as S

    return {"shapes": S.SHAPES, "palette": S.PALETTE, "background": S.BACKGROUND, "counts": S.COUNTING_COUNTS,
            "sizes": [S.MIN_FRAC, S.MAX_FRAC, S.MIN_SIDE, S.GAP_FRAC, S.MIN_GAP, S.LAYOUT_MARGIN],
            "test_fraction": S.TEST_FRACTION, "held_out": sorted(S.HELD_OUT_COMBOS)}


def cache_key(settings: PretrainSettings, name: str = "custom") -> str:
    """``shapes-<name>-<12 hex>``: a hash of the settings, the spec, the code versions and the world."""
    payload = json.dumps({"settings": settings.to_dict(), "spec": spec_settings(get_spec(settings.spec)),
                          "pretrain_code": PRETRAIN_CODE_VERSION, "tiny_code": TINY_CODE_VERSION,
                          "world": world_fingerprint()}, sort_keys=True, default=list)
    return f"shapes-{name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


# --------------------------------------------------------------------------------------------------- data


def shapes_vocabulary() -> tuple[str, ...]:
    """Every word of every shapes-world prompt (the ``shapes`` spec's whole-word tokens)."""
    from flowgrpo.eval import shapes as S

    words: set[str] = set()
    for tag in ALL_TAGS:
        for row in S.all_prompts(tag):
            words.update(row["prompt"].split())
    return tuple(sorted(words))


class _Rows:
    """Tag-balanced draws of train-split metadata rows."""

    def __init__(self, tags: Sequence[str], holdout: str):
        from flowgrpo.eval import shapes as S

        self.pools = [S.split_prompts(t, "train", holdout) for t in tags]
        empty = [t for t, p in zip(tags, self.pools) if not p]
        if empty:
            raise ValueError(f"no train prompts for tags {empty}")

    def draw(self, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        tags = rng.integers(len(self.pools), size=n)
        return [self.pools[t][int(rng.integers(len(self.pools[t])))] for t in tags]


#: ``layout="grid"``: object sides (fraction of the image size), centre jitter (fraction) and the grid
GRID_SIDE_FRAC, GRID_JITTER_FRAC, GRID_CELLS = (0.19, 0.25), 0.025, 3
#: ``layout="canonical"``: the objects never share a row or column of adjacent cells, so they can be larger
CANONICAL_SIDE_FRAC, CANONICAL_JITTER_FRAC = (0.25, 0.30), 0.03
_STEP = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}  # (d row, d col) sign


def grid_layout(row: dict[str, Any], size: int, rng: np.random.Generator, max_tries: int = 200) -> list[Any]:
    """A low-entropy layout of a metadata row for pretraining: every object in its own cell of a 3 x 3 grid
    (side 0.19-0.25 x size, centre jittered by <= 0.025 x size), relations on one row / column ("A left of B":
    same row, a column left of B's). Satisfies the row (the rules' relation test with the layout margin, >= 2 px
    between objects), like :func:`flowgrpo.eval.shapes.layout`; returns its ``ShapeObject`` list."""
    from flowgrpo.eval import shapes as S
    from flowgrpo.rewards.geneval.rules import relative_position

    objs = [(j, c["class"], c.get("color") or S.COLORS[int(rng.integers(len(S.COLORS)))])
            for j, c in enumerate(row["include"]) for _ in range(int(c["count"]))]
    rels = [(j, c["position"][0], int(c["position"][1])) for j, c in enumerate(row["include"]) if "position" in c]
    n, g = len(objs), GRID_CELLS
    if n > g * g:
        raise ValueError(f"{n} objects do not fit a {g} x {g} grid")
    lo, hi = (max(S.MIN_SIDE, int(round(f * size))) for f in GRID_SIDE_FRAC)
    jit = GRID_JITTER_FRAC * size
    for _ in range(max_tries):
        cells = [int(c) for c in rng.permutation(g * g)[:n]]
        for j, rel, k in rels:  # place clause j relative to (the first object of) clause k
            ia = next(i for i, o in enumerate(objs) if o[0] == j)
            ib = next(i for i, o in enumerate(objs) if o[0] == k)
            rb, cb = divmod(cells[ib], g)
            dr, dc = _STEP[rel]
            options = [r * g + c for r in range(g) for c in range(g)
                       if (r == rb if dr == 0 else (r - rb) * dr > 0) and (c == cb if dc == 0 else (c - cb) * dc > 0)
                       and r * g + c not in cells[:ia] + cells[ia + 1:]]
            if not options:
                break
            cells[ia] = int(options[int(rng.integers(len(options)))])
        else:
            placed = _place_in_cells(objs, cells, size, (lo, hi), jit, rng)
            apart = all(a.box[2] + 2 <= b.box[0] or b.box[2] + 2 <= a.box[0] or
                        a.box[3] + 2 <= b.box[1] or b.box[3] + 2 <= a.box[1]
                        for a, b in itertools.combinations(placed, 2))
            if apart and all(relative_position(a.box, b.box, margin=S.LAYOUT_MARGIN) == {rel}
                             and relative_position(a.box, b.box) == {rel}
                             for j, rel, k in rels for a in placed if a.clause == j for b in placed if b.clause == k):
                return placed
    raise RuntimeError(f"could not lay out {row.get('prompt')!r} on the grid in {max_tries} tries")


#: ``layout="canonical"``: grid cells (row-major 0..8 of a 3 x 3 grid) per number of objects - a few mirror-image
#: arrangements each - and per relation ("A <relation> B" -> (cell of A, cell of B))
CANONICAL_CELLS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((4,),), 2: ((3, 5), (1, 7)), 3: ((0, 2, 7), (6, 8, 1)), 4: ((0, 2, 6, 8),),
}
CANONICAL_RELATION_CELLS = {"left of": (3, 5), "right of": (5, 3), "above": (1, 7), "below": (7, 1)}


def canonical_layout(row: dict[str, Any], size: int, rng: np.random.Generator) -> list[Any]:
    """An even lower-entropy layout than :func:`grid_layout`: the objects go to a few fixed cell arrangements
    (:data:`CANONICAL_CELLS`, order of the objects random; relations in :data:`CANONICAL_RELATION_CELLS`), with the
    same side range and jitter (single objects jitter 3x more)."""
    from flowgrpo.eval import shapes as S

    objs = [(j, c["class"], c.get("color") or S.COLORS[int(rng.integers(len(S.COLORS)))])
            for j, c in enumerate(row["include"]) for _ in range(int(c["count"]))]
    rels = [(j, c["position"][0], int(c["position"][1])) for j, c in enumerate(row["include"]) if "position" in c]
    if rels:
        (j, rel, k), = rels
        a_cell, b_cell = CANONICAL_RELATION_CELLS[rel]
        cells = [a_cell if o[0] == j else b_cell for o in objs]
    else:
        options = CANONICAL_CELLS[len(objs)]
        chosen = options[int(rng.integers(len(options)))]
        cells = [chosen[i] for i in rng.permutation(len(objs))]
    lo, hi = (max(S.MIN_SIDE, int(round(f * size))) for f in CANONICAL_SIDE_FRAC)
    jit = CANONICAL_JITTER_FRAC * size * (2 if len(objs) == 1 else 1)
    return _place_in_cells(objs, cells, size, (lo, hi), jit, rng)


def _place_in_cells(objs: Sequence[tuple[int, str, str]], cells: Sequence[int], size: int, sides: tuple[int, int],
                    jit: float, rng: np.random.Generator) -> list[Any]:
    """``ShapeObject`` s: object ``(clause, shape, colour)`` i centred in grid cell ``cells[i]`` (row-major, a
    :data:`GRID_CELLS` square grid), side drawn from ``sides`` (inclusive), centre jittered by up to ``jit`` px,
    kept 1 px inside the image; the box is the shape's tight pixel box."""
    from flowgrpo.eval import shapes as S

    lo, hi = sides
    cell = size / GRID_CELLS
    placed = []
    for (j, shape, color), cidx in zip(objs, cells):
        r, c = divmod(cidx, GRID_CELLS)
        side = int(rng.integers(lo, hi + 1))
        cx, cy = (c + 0.5) * cell + rng.uniform(-jit, jit), (r + 0.5) * cell + rng.uniform(-jit, jit)
        x0 = int(np.clip(round(cx - side / 2), 1, size - side - 1))
        y0 = int(np.clip(round(cy - side / 2), 1, size - side - 1))
        cov = S.shape_coverage(shape, side, side) > 0
        rows_, cols_ = np.flatnonzero(cov.any(1)), np.flatnonzero(cov.any(0))
        box = (x0 + int(cols_[0]), y0 + int(rows_[0]), x0 + int(cols_[-1]) + 1, y0 + int(rows_[-1]) + 1)
        placed.append(S.ShapeObject(shape, color, (x0, y0), side, box, j))
    return placed


def render_images(rows: Sequence[dict], size: int, seed: Sequence[int], antialias: bool,
                  layout: str = "random") -> torch.Tensor:
    """fp32 [N, 3, size, size] in [-1, 1] (the VAE's input range). ``layout``: "random" (the shapes world's own
    :func:`~flowgrpo.eval.shapes.render`) or "grid" (:func:`grid_layout`)."""
    from flowgrpo.eval import shapes as S

    out = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        if layout in ("grid", "canonical"):
            rng = np.random.default_rng([*seed, i])
            objs = grid_layout(row, size, rng) if layout == "grid" else canonical_layout(row, size, rng)
            out[i] = S.draw(objs, size, rng, 0.0, antialias)
        else:
            out[i] = S.render(row, size, seed=[*seed, i], antialias=antialias)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _background(device: torch.device | str = "cpu") -> torch.Tensor:
    from flowgrpo.eval import shapes as S

    return (torch.tensor(S.BACKGROUND, dtype=torch.float32, device=device) / 127.5 - 1.0).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------ helpers


def _lr_factor(step: int, total: int, warmup: int, final: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p))


class _EMA:
    """Exponential moving average of parameters, decay ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.decay, self.n = float(decay), 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


class _Deadline:
    def __init__(self, budget_s: float | None):
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.hit = False

    def expired(self) -> bool:
        if self.budget_s is not None and time.monotonic() - self.t0 > self.budget_s:
            self.hit = True
        return self.hit

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def sample_sigmas(n: int, settings: PretrainSettings, shift: float, gen: torch.Generator) -> torch.Tensor:
    """fp32 [n] training noise levels: logit-normal (or uniform) ``u``, shifted like the SD3 scheduler."""
    if settings.timestep_sampling == "logit_normal":
        u = torch.sigmoid(settings.logit_mean + settings.logit_std * torch.randn(n, generator=gen))
    else:
        u = torch.rand(n, generator=gen)
    return shift * u / (1.0 + (shift - 1.0) * u)


# ---------------------------------------------------------------------------------------------- stage 1: VAE


def train_vae(vae: torch.nn.Module, settings: PretrainSettings, deadline: _Deadline | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Stage 1 in place; sets ``vae.config.shift_factor`` / ``scaling_factor``. Returns stats (losses, steps)."""
    deadline = deadline or _Deadline(None)
    s = settings
    rows = _Rows(s.tags, s.holdout)
    rng = np.random.default_rng([s.seed, 1])
    gen = torch.Generator().manual_seed(s.seed * 1000 + 1)
    bg = _background()
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    losses: list[float] = []
    step = 0
    for step in range(s.vae_steps):
        if deadline.expired():
            break
        for g in opt.param_groups:
            g["lr"] = s.vae_lr * _lr_factor(step, s.vae_steps, max(1, s.vae_steps // 20), 0.05)
        x = render_images(rows.draw(s.vae_batch_size, rng), s.resolution, (s.seed, 1, step), s.antialias, s.layout)
        if s.vae_crop and s.vae_crop < s.resolution:
            f = get_spec(s.spec).vae_scale_factor
            hi = (s.resolution - s.vae_crop) // f + 1
            ox = torch.randint(hi, (len(x),), generator=gen) * f
            oy = torch.randint(hi, (len(x),), generator=gen) * f
            x = torch.stack([x[j, :, oy[j]: oy[j] + s.vae_crop, ox[j]: ox[j] + s.vae_crop] for j in range(len(x))])
        mean = vae.encode(x).latent_dist.mean
        z = mean + s.vae_latent_noise * mean.detach().std() * torch.randn(mean.shape, generator=gen)
        rec = vae.decode(z).sample
        w = 1.0 + s.vae_object_weight * ((x - bg).abs().sum(1, keepdim=True) > 0.05).float()
        err = rec - x
        loss = (err.abs() * w).mean() + (err.square() * w).mean() + 1e-4 * mean.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log and (step % 100 == 0 or step == s.vae_steps - 1):
            log(f"vae step {step}: loss {loss.item():.4f} ({deadline.elapsed():.0f}s)")
    done = len(losses)
    vae.eval().requires_grad_(False)
    # latent statistics -> shift/scale (SD3 stores them in the VAE config)
    calib = _Rows(s.tags, s.holdout).draw(256, np.random.default_rng([s.seed, 2]))
    with torch.no_grad():
        lat = torch.cat([vae.encode(render_images(calib[i: i + 64], s.resolution, (s.seed, 2, i), s.antialias,
                                                       s.layout))
                         .latent_dist.mean for i in range(0, len(calib), 64)])
    shift, std = float(lat.mean()), float(lat.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / max(std, 1e-6))
    # the ceiling of any generator through this VAE, on unseen (test-split) scenes: the training layout and the
    # shapes world's own (smaller, random) one
    ceiling = {f"vae_recon_accuracy_{lay}": vae_reconstruction_accuracy(vae, s, n=64, split="test", layout=lay)
               for lay in ("canonical", "random")} if done else {}
    return {"vae_steps_done": done, "vae_loss_first": losses[0] if losses else None,
            "vae_loss_last": float(np.mean(losses[-20:])) if losses else None,
            "vae_shift_factor": shift, "vae_scaling_factor": 1.0 / max(std, 1e-6), **ceiling}


@torch.no_grad()
def vae_reconstruction_accuracy(vae: torch.nn.Module, settings: PretrainSettings, n: int = 64,
                                split: str = "train", layout: str = "random") -> float:
    """Fraction of rendered images that the shapes detector still judges correct after encode -> decode: the
    ceiling the generator can reach through this VAE."""
    from flowgrpo.eval import shapes as S

    ps = S.prompt_set(n, seed=settings.seed + 7, split=split, tags=settings.tags, holdout=settings.holdout)
    x = render_images(ps.metadata, settings.resolution, (settings.seed, 3), settings.antialias, layout)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return float(np.mean([S.score(u8[i], ps.metadata[i])[0] for i in range(n)]))


# ------------------------------------------------------------------------------------- stage 2: rectified flow


def encode_latents(vae: torch.nn.Module, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Scaled latents ``(mean - shift) * scale`` (what :meth:`SD3Adapter.decode` inverts)."""
    shift = float(vae.config.shift_factor or 0.0)
    scale = float(vae.config.scaling_factor)
    with torch.no_grad():
        return torch.cat([(vae.encode(images[i: i + batch]).latent_dist.mean - shift) * scale
                          for i in range(0, len(images), batch)])


def _trainable_modules(pipe: Any, settings: PretrainSettings) -> list[torch.nn.Module]:
    mods = [pipe.transformer]
    if settings.train_text_encoders:
        mods += [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
    return mods


def flow_loss(pipe: Any, latents: torch.Tensor, prompts: Sequence[str], sigmas: torch.Tensor,
              noise: torch.Tensor, max_sequence_length: int) -> torch.Tensor:
    """Rectified-flow MSE of one batch: ``x_s = (1 - s) x0 + s eps``, target ``eps - x0``; the conditioning
    comes from ``pipe.encode_prompt`` exactly as :meth:`SD3Adapter.encode_prompts` computes it."""
    pe, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device=latents.device,
                                          do_classifier_free_guidance=False,
                                          max_sequence_length=max_sequence_length)
    s = sigmas.view(-1, 1, 1, 1)
    x_t = (1.0 - s) * latents + s * noise
    v = pipe.transformer(hidden_states=x_t, encoder_hidden_states=pe.float(), pooled_projections=pooled.float(),
                         timestep=sigmas * pipe.scheduler.config.num_train_timesteps, return_dict=False)[0]
    return torch.nn.functional.mse_loss(v.float(), noise - latents)


def train_flow(pipe: Any, settings: PretrainSettings, deadline: _Deadline | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Stage 2 in place (the pipeline's VAE must be trained already); the trainable modules end up holding the EMA
    weights, in eval mode. Returns stats (the loss curve: means over chunks of steps, at most ~60 points)."""
    deadline = deadline or _Deadline(None)
    s = settings
    rows = _Rows(s.tags, s.holdout)
    rng = np.random.default_rng([s.seed, 4])
    gen = torch.Generator().manual_seed(s.seed * 1000 + 4)
    shift = float(pipe.scheduler.config.get("shift", 1.0))
    # a fixed encoded dataset, cycled (encoding every batch anew would cost a VAE encoder pass per sample)
    n_data = s.dataset_size or s.steps * s.batch_size
    data_rows = rows.draw(n_data, rng) if s.dataset_size else None
    data_lat = None
    if s.dataset_size:
        chunks = []
        for i in range(0, n_data, 256):
            chunks.append(encode_latents(pipe.vae, render_images(data_rows[i: i + 256], s.resolution, (s.seed, 5, i),
                                                                 s.antialias, s.layout)))
        data_lat = torch.cat(chunks)
        if log:
            log(f"encoded {n_data} training images ({deadline.elapsed():.0f}s)")
    modules = _trainable_modules(pipe, s)
    for m in modules:
        m.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    ema = _EMA(params, s.ema_decay)
    losses: list[float] = []
    order = torch.randperm(n_data, generator=gen) if s.dataset_size else None
    cursor = 0
    for step in range(s.steps):
        if deadline.expired():
            break
        for g in opt.param_groups:
            g["lr"] = s.lr * _lr_factor(step, s.steps, s.warmup_steps, s.final_lr_fraction)
        if s.dataset_size:
            if cursor + s.batch_size > n_data:
                order, cursor = torch.randperm(n_data, generator=gen), 0
            idx = order[cursor: cursor + s.batch_size]
            cursor += s.batch_size
            x0 = data_lat[idx]
            batch_rows = [data_rows[i] for i in idx.tolist()]
        else:
            batch_rows = rows.draw(s.batch_size, rng)
            x0 = encode_latents(pipe.vae, render_images(batch_rows, s.resolution, (s.seed, 6, step), s.antialias,
                                                             s.layout))
        prompts = [("" if float(u) < s.cfg_dropout else r["prompt"])
                   for u, r in zip(torch.rand(len(batch_rows), generator=gen), batch_rows)]
        sig = sample_sigmas(len(prompts), s, shift, gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(pipe, x0, prompts, sig, noise, s.max_sequence_length)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        ema.update()
        losses.append(loss.item())
        if log and (step % 100 == 0 or step == s.steps - 1):
            log(f"flow step {step}: loss {np.mean(losses[-100:]):.4f} ({deadline.elapsed():.0f}s)")
    ema.copy_to_params()
    for m in modules:
        m.eval().requires_grad_(False)
    chunk = max(1, len(losses) // 60)  # at most ~60 points
    curve = [float(np.mean(losses[i: i + chunk])) for i in range(0, len(losses), chunk)]
    return {"flow_steps_done": len(losses), "flow_loss_curve": curve,
            "flow_loss_first": curve[0] if curve else None, "flow_loss_last": curve[-1] if curve else None}


# --------------------------------------------------------------------------------------------------- driver


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_shapes_pipeline(settings: PretrainSettings) -> Any:
    """The untrained pipeline of ``settings.spec`` (random weights from ``settings.seed``)."""
    from flowgrpo.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(settings.spec, seed=settings.seed)


def pretrain_pipeline(settings: PretrainSettings, budget_s: float | None = None,
                      log: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """(trained in-memory pipeline, info dict). See the module docstring."""
    deadline = _Deadline(budget_s)
    pipe = build_shapes_pipeline(settings)
    with _seeded(settings.seed):
        vae_stats = train_vae(pipe.vae, settings, deadline, log)
        t_vae = deadline.elapsed()
        flow_stats = train_flow(pipe, settings, deadline, log)
    info = {"settings": settings.to_dict(), "pretrain_code_version": PRETRAIN_CODE_VERSION,
            "tiny_code_version": TINY_CODE_VERSION, "max_sequence_length": settings.max_sequence_length,
            "resolution": settings.resolution, "vae_seconds": round(t_vae, 1),
            "seconds": round(deadline.elapsed(), 1), "budget_s": budget_s, "stopped_early": deadline.hit,
            "torch_threads": torch.get_num_threads(),
            "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
            **vae_stats, **flow_stats}
    return pipe, info


def save_pipeline(pipe: Any, out_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / PRETRAIN_MARKER).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out


def pretrain_shapes(out_dir: str | os.PathLike, *, seed: int = 0, steps: int | None = None,
                    resolution: int | None = None, budget_s: float | None = 900.0,
                    settings: PretrainSettings | None = None, preset: str = "default",
                    log: Callable[[str], None] | None = print) -> Path:
    """Pretrain a shapes-world base model and save it (diffusers format + ``flowgrpo_pretrain.json``) to
    ``out_dir``. ``settings`` (default: preset ``preset``) with ``seed`` / ``steps`` / ``resolution`` overriding
    their fields; ``budget_s`` caps the wall time of both stages together (None = no cap). Returns the path."""
    base = settings if settings is not None else get_preset(preset)
    changes: dict[str, Any] = {"seed": seed}
    if steps is not None:
        changes["steps"] = steps
    if resolution is not None:
        changes["resolution"] = resolution
    s = base.replace(**changes)
    pipe, info = pretrain_pipeline(s, budget_s=budget_s, log=log)
    return save_pipeline(pipe, out_dir, info)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_shapes_model(preset: str | PretrainSettings = "default", cache_dir: str | os.PathLike | None = None,
                        log: Callable[[str], None] | None = None) -> Path:
    """The directory of the pretrained shapes model ``preset`` (a name in :data:`PRESETS` or settings), built on
    first use under ``cache_dir`` (default :func:`~flowgrpo.models.tiny.default_cache_root`) as
    ``<cache_dir>/shapes-<name>-<hash>``. Concurrent callers wait on a lock file instead of training twice; the
    build goes to a temp dir renamed into place, so nobody sees a half-written model."""
    settings = get_preset(preset) if isinstance(preset, str) else preset
    name = preset if isinstance(preset, str) else "custom"
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / cache_key(settings, name)
    if (final / PRETRAIN_MARKER).is_file():
        return final
    with _file_lock(root / f".{final.name}.lock"):
        if (final / PRETRAIN_MARKER).is_file():  # built by whoever held the lock
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        if log:
            log(f"pretraining the shapes base model {name!r} once into {final} ({settings.vae_steps} VAE + "
                f"{settings.steps} flow-matching steps; later runs reuse it)")
        try:
            pipe, info = pretrain_pipeline(settings, budget_s=None, log=log)
            info["cache_key"] = final.name
            save_pipeline(pipe, tmp, info)
            if final.exists():  # an incomplete leftover
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``flowgrpo_pretrain.json`` of a pretrained directory ({} when absent)."""
    p = Path(model_dir) / PRETRAIN_MARKER
    return json.loads(p.read_text()) if p.is_file() else {}


# ------------------------------------------------------------------------------------------------------ CLI


def cli_pretrain_shapes(args: Any) -> int:
    """``flowgrpo pretrain-shapes OUT_DIR [--seed N] [--steps N] [--resolution PX] [--budget-s S]
    [--preset default|small] [--threads N]``: prints the info JSON (one line). ``args`` needs ``out_dir``; the
    other attributes default as listed in the CLI."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(int(args.threads))
    budget_s = getattr(args, "budget_s", 900.0)
    budget = None if budget_s is None or budget_s <= 0 else budget_s
    out = pretrain_shapes(args.out_dir, seed=getattr(args, "seed", 0), steps=getattr(args, "steps", None),
                          resolution=getattr(args, "resolution", None), budget_s=budget,
                          preset=getattr(args, "preset", "default"),
                          log=lambda m: print(f"[pretrain-shapes] {m}", flush=True))
    info = read_info(out)
    print(json.dumps({"out_dir": str(out), **{k: v for k, v in info.items() if k not in ("settings", "flow_loss_curve")}},
                     default=str))
    return 0


__all__ = [
    "PRESETS", "PRETRAIN_CODE_VERSION", "PRETRAIN_MARKER", "PretrainSettings", "cache_key",
    "cached_shapes_model", "cli_pretrain_shapes", "encode_latents", "flow_loss", "get_preset", "pretrain_pipeline",
    "pretrain_shapes", "read_info", "sample_sigmas", "shapes_vocabulary", "train_flow", "train_vae",
    "vae_reconstruction_accuracy", "world_fingerprint",
]
