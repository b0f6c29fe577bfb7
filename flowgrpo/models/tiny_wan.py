"""Offline tiny Wan2.1 text-to-video pipelines (random weights) for development and tests.

The Wan counterpart of :mod:`flowgrpo.models.tiny_flux`: a ``WanPipeline`` built in memory from configs (no hub),
with a tiny ``WanTransformer3DModel`` (patch (1, 2, 2), 3-axis rotary embedding), a tiny causal-3D
``AutoencoderKLWan`` (16 latent channels, 8x spatial / 4x temporal compression and Wan2.1's ``latents_mean`` /
``latents_std``, as the real VAE), a tiny ``UMT5EncoderModel`` with the offline character-level T5 tokenizer of
:mod:`flowgrpo.models.tiny`, and Wan2.1's scheduler (``UniPCMultistepScheduler`` with flow sigmas, flow shift 3.0).
Weights are a deterministic function of ``(spec, seed)``. The marker JSON also records the default clip length
(``num_frames``), which :class:`~flowgrpo.models.wan.WanAdapter` reads.

Usage::

    pipe = build_tiny_wan_pipeline("tiny", seed=0)      # in memory, every component in .eval()
    path = cached_tiny_wan_model("tiny")                # diffusers-format directory, built once
    WanPipeline.from_pretrained(path)                   # works offline
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .tiny import build_once, build_t5_tokenizer, default_cache_root, spec_cache_key, tiny_t5_config, write_tiny_marker

if TYPE_CHECKING:  # diffusers takes seconds to import
    from diffusers import WanPipeline

#: bump when the construction code changes in a way that changes the saved model (invalidates caches)
TINY_WAN_CODE_VERSION = 1


@dataclass(frozen=True)
class TinyWanSpec:
    """Sizes of a tiny Wan pipeline. The UMT5 ``d_model`` is the transformer's ``text_dim``; the transformer's hidden
    size is ``num_heads * head_dim``; Wan's rotary embedding splits ``head_dim`` into (frames, rows, columns) parts
    of ``head_dim - 4 (head_dim // 6)``, ``2 (head_dim // 6)``, ``2 (head_dim // 6)`` (so ``head_dim >= 6``)."""

    name: str
    # VAE (Wan2.1: base_dim 96, dim_mult (1, 2, 4, 4), 2 res blocks, z_dim 16, temporal downsampling in the last two
    # stages -> 8x spatial, 4x temporal; frames = 4k + 1 -> k + 1 latent frames)
    vae_base_dim: int = 4
    vae_dim_mult: tuple[int, ...] = (1, 1, 1, 1)
    vae_num_res_blocks: int = 1
    vae_temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_channels: int = 16  # z_dim; latents_mean / latents_std keep Wan2.1's 16 values
    #: default image size in pixels (the adapter's default resolution) and clip length (4k + 1 frames)
    resolution: int = 32
    num_frames: int = 5
    # transformer
    num_layers: int = 2
    head_dim: int = 12  # rotary split: 4 (frames) + 4 (rows) + 4 (columns)
    num_heads: int = 2
    ffn_dim: int = 32
    freq_dim: int = 32  # sinusoidal timestep features
    rope_max_seq_len: int = 32
    # text encoder (UMT5)
    t5_d_model: int = 32
    t5_layers: int = 2
    t5_heads: int = 4
    t5_d_kv: int = 8
    t5_d_ff: int = 64
    # scheduler: Wan2.1's (UniPC with flow sigmas, static shift)
    flow_shift: float = 3.0

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_dim_mult) - 1)


TINY_WAN_SPECS: dict[str, TinyWanSpec] = {
    # fast tests: 32 px x 5 frames -> latent [16, 2, 4, 4] (8 video tokens), ~30k transformer params
    "tiny": TinyWanSpec(name="tiny"),
}


def get_wan_spec(spec_name: str) -> TinyWanSpec:
    try:
        return TINY_WAN_SPECS[spec_name]
    except KeyError:
        raise ValueError(f"unknown tiny Wan spec {spec_name!r}; known: {sorted(TINY_WAN_SPECS)}") from None


def build_tiny_wan_pipeline(spec_name: str = "tiny", seed: int = 0) -> "WanPipeline":
    """A random-weight Wan2.1 T2V pipeline of spec ``spec_name``; weights are deterministic given ``seed`` (the
    global torch RNG is left untouched). Every component is in ``.eval()``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    s = get_wan_spec(spec_name)
    if s.head_dim < 6:
        raise ValueError(f"spec {spec_name!r}: Wan's rotary embedding needs head_dim >= 6, got {s.head_dim}")
    if (s.num_frames - 1) % 4:
        raise ValueError(f"spec {spec_name!r}: num_frames must be 4k + 1, got {s.num_frames}")
    tok = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=s.num_heads,
            attention_head_dim=s.head_dim,
            in_channels=s.latent_channels,
            out_channels=s.latent_channels,
            text_dim=s.t5_d_model,
            freq_dim=s.freq_dim,
            ffn_dim=s.ffn_dim,
            num_layers=s.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=s.rope_max_seq_len,
        )
        vae = AutoencoderKLWan(
            base_dim=s.vae_base_dim,
            z_dim=s.latent_channels,
            dim_mult=list(s.vae_dim_mult),
            num_res_blocks=s.vae_num_res_blocks,
            temperal_downsample=list(s.vae_temporal_downsample),
        )
        text_encoder = UMT5EncoderModel(tiny_t5_config(s, tok, s.t5_d_model, UMT5Config))
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=s.flow_shift,
    )
    for m in (transformer, vae, text_encoder):
        m.eval()
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)


def make_tiny_wan_model(out_dir: str | os.PathLike, seed: int = 0, spec_name: str = "tiny") -> Path:
    """Save a complete diffusers-format Wan pipeline directory plus ``flowgrpo_tiny.json`` (``"family": "wan"``,
    ``"resolution"``, ``"num_frames"``); ``WanPipeline.from_pretrained(out_dir)`` then works offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_wan_spec(spec_name)
    pipe = build_tiny_wan_pipeline(spec_name, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    write_tiny_marker(out, pipe, spec_name, seed, TINY_WAN_CODE_VERSION, dataclasses.asdict(spec), spec.resolution,
                      family="wan", num_frames=spec.num_frames)
    return out


def tiny_wan_cache_key(spec_name: str = "tiny", seed: int = 0) -> str:
    """``wan-<spec>-<12 hex>``: hash of the spec's settings, the seed and :data:`TINY_WAN_CODE_VERSION`."""
    return spec_cache_key(f"wan-{spec_name}", "wan", dataclasses.asdict(get_wan_spec(spec_name)), seed,
                          TINY_WAN_CODE_VERSION)


def cached_tiny_wan_model(spec_name: str = "tiny", cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The directory of tiny Wan model ``spec_name``, built on first use as ``<cache_dir>/wan-<spec>-<hash>``
    (default cache root: :func:`flowgrpo.models.tiny.default_cache_root`). Built atomically
    (:func:`~flowgrpo.models.tiny.build_once`)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return build_once(root / tiny_wan_cache_key(spec_name, seed),
                      lambda d: make_tiny_wan_model(d, seed=seed, spec_name=spec_name))


__all__ = [
    "TINY_WAN_SPECS",
    "TinyWanSpec",
    "build_tiny_wan_pipeline",
    "cached_tiny_wan_model",
    "get_wan_spec",
    "make_tiny_wan_model",
    "tiny_wan_cache_key",
]
