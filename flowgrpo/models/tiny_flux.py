"""Offline tiny FLUX.1 pipelines (random weights) for development and tests.

The FLUX counterpart of :mod:`flowgrpo.models.tiny`: a ``FluxPipeline`` built in memory from configs (no hub),
with the same character-level tokenizers (CLIP for the pooled embedding, T5 for the sequence), a guidance-embedding
("dev"-style, distilled guidance) ``FluxTransformer2DModel``, a 16-channel ``AutoencoderKL`` without quant convs
(as FLUX's) and FLUX.1-dev's dynamic-shift scheduler config. Weights are a deterministic function of
``(spec, seed)``.

Usage::

    pipe = build_tiny_flux_pipeline("tiny", seed=0)      # in memory, every component in .eval()
    path = cached_tiny_flux_model("tiny")                # diffusers-format directory, built once
    FluxPipeline.from_pretrained(path)                   # works offline
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .tiny import (build_clip_tokenizer, build_once, build_t5_tokenizer, default_cache_root, spec_cache_key,
                   tiny_clip_config, tiny_sd_vae, tiny_t5_config, write_tiny_marker)

if TYPE_CHECKING:  # diffusers takes seconds to import
    from diffusers import FluxPipeline

#: bump when the construction code changes in a way that changes the saved model (invalidates caches)
TINY_FLUX_CODE_VERSION = 1


@dataclass(frozen=True)
class TinyFluxSpec:
    """Sizes of a tiny FLUX pipeline. The T5 ``d_model`` is the transformer's ``joint_attention_dim``; the CLIP
    hidden size is its ``pooled_projection_dim`` (FLUX uses CLIP's pooled output, no projection); the transformer
    sees 2x2-packed latents, so ``in_channels`` = 4 x ``latent_channels``; ``sum(axes_dims_rope)`` = ``head_dim``."""

    name: str
    # VAE (FLUX: 16 latent channels, scaling 0.3611, shift 0.1159, no quant/post-quant convs)
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # 4 blocks -> vae_scale_factor 8
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 4
    latent_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    #: default image size in pixels (stored as the VAE's ``sample_size``; the adapter's default resolution)
    resolution: int = 64
    # transformer
    num_layers: int = 2  # double-stream (MM-DiT) blocks
    num_single_layers: int = 2  # single-stream blocks
    head_dim: int = 16
    num_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    guidance_embeds: bool = True  # FLUX.1-dev style distilled guidance
    # text encoders
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_heads: int = 4
    clip_intermediate: int = 64
    t5_d_model: int = 32
    t5_layers: int = 2
    t5_heads: int = 4
    t5_d_kv: int = 8
    t5_d_ff: int = 64
    clip_max_length: int = 77
    #: extra whole-word tokens for both tokenizers (see :func:`flowgrpo.models.tiny.build_clip_tokenizer`)
    vocab_words: tuple[str, ...] = ()
    # scheduler: FLUX.1-dev's (resolution-dependent shift mu from the image sequence length)
    shift: float = 3.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    #: the diffusers pipeline class: ``FluxKontextPipeline`` has the same components and edits a source image
    pipeline: str = "FluxPipeline"

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


TINY_FLUX_SPECS: dict[str, TinyFluxSpec] = {
    # fast tests: 64 px (a 4 x 4 = 16 token image sequence), ~70k transformer params
    "tiny": TinyFluxSpec(name="tiny"),
    # the same sizes as a FLUX.1-Kontext pipeline (``tiny-flux-kontext``; family flux_kontext)
    "kontext": TinyFluxSpec(name="kontext", pipeline="FluxKontextPipeline"),
}

#: pipeline class -> model family written to the marker file
_FAMILY = {"FluxPipeline": "flux", "FluxKontextPipeline": "flux_kontext"}


def get_flux_spec(spec_name: str) -> TinyFluxSpec:
    try:
        return TINY_FLUX_SPECS[spec_name]
    except KeyError:
        raise ValueError(f"unknown tiny FLUX spec {spec_name!r}; known: {sorted(TINY_FLUX_SPECS)}") from None


def build_tiny_flux_pipeline(spec_name: str = "tiny", seed: int = 0) -> "FluxPipeline":
    """A random-weight FLUX pipeline of spec ``spec_name``; weights are deterministic given ``seed`` (the global
    torch RNG is left untouched). Every component is in ``.eval()``."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    s = get_flux_spec(spec_name)
    if sum(s.axes_dims_rope) != s.head_dim:
        raise ValueError(f"spec {spec_name!r}: sum(axes_dims_rope)={sum(s.axes_dims_rope)} != head_dim={s.head_dim}")
    # extra words only when the spec has some (older tiny.py builders take no extra_words)
    clip_tok = build_clip_tokenizer(s.clip_max_length, s.vocab_words) if s.vocab_words else build_clip_tokenizer(
        s.clip_max_length)
    t5_tok = build_t5_tokenizer(s.vocab_words) if s.vocab_words else build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * s.latent_channels,
            num_layers=s.num_layers,
            num_single_layers=s.num_single_layers,
            attention_head_dim=s.head_dim,
            num_attention_heads=s.num_heads,
            joint_attention_dim=s.t5_d_model,
            pooled_projection_dim=s.clip_hidden,
            guidance_embeds=s.guidance_embeds,
            axes_dims_rope=s.axes_dims_rope,
        )
        vae = tiny_sd_vae(s)
        text_encoder = CLIPTextModel(tiny_clip_config(s, clip_tok))
        text_encoder_2 = T5EncoderModel(tiny_t5_config(s, t5_tok, s.t5_d_model))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=s.shift,
        use_dynamic_shifting=True,
        base_shift=s.base_shift,
        max_shift=s.max_shift,
        base_image_seq_len=s.base_image_seq_len,
        max_image_seq_len=s.max_image_seq_len,
    )
    for m in (transformer, vae, text_encoder, text_encoder_2):
        m.eval()
    return getattr(diffusers, s.pipeline)(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def make_tiny_flux_model(out_dir: str | os.PathLike, seed: int = 0, spec_name: str = "tiny") -> Path:
    """Save a complete diffusers-format FLUX pipeline directory plus ``flowgrpo_tiny.json`` (``"family": "flux"``);
    ``FluxPipeline.from_pretrained(out_dir)`` then works offline. Returns ``Path(out_dir)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_flux_spec(spec_name)
    pipe = build_tiny_flux_pipeline(spec_name, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    write_tiny_marker(out, pipe, spec_name, seed, TINY_FLUX_CODE_VERSION, dataclasses.asdict(spec), spec.resolution,
                      family=_FAMILY[spec.pipeline])
    return out


def tiny_flux_cache_key(spec_name: str = "tiny", seed: int = 0) -> str:
    """``flux-<spec>-<12 hex>``: hash of the spec's settings, the seed and :data:`TINY_FLUX_CODE_VERSION`."""
    spec = dataclasses.asdict(get_flux_spec(spec_name))
    if spec["pipeline"] == "FluxPipeline":  # the field came later: keep the text-to-image models' keys
        del spec["pipeline"]
    return spec_cache_key(f"flux-{spec_name}", "flux", spec, seed, TINY_FLUX_CODE_VERSION)


def cached_tiny_flux_model(spec_name: str = "tiny", cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The directory of tiny FLUX model ``spec_name``, built on first use as ``<cache_dir>/flux-<spec>-<hash>``
    (default cache root: :func:`flowgrpo.models.tiny.default_cache_root`). Built atomically
    (:func:`~flowgrpo.models.tiny.build_once`)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return build_once(root / tiny_flux_cache_key(spec_name, seed),
                      lambda d: make_tiny_flux_model(d, seed=seed, spec_name=spec_name))


__all__ = [
    "TINY_FLUX_SPECS",
    "TinyFluxSpec",
    "build_tiny_flux_pipeline",
    "cached_tiny_flux_model",
    "get_flux_spec",
    "make_tiny_flux_model",
    "tiny_flux_cache_key",
]
