"""Offline tiny Qwen-Image / Qwen-Image-Edit pipelines (random weights) for development and tests.

The Qwen counterpart of :mod:`flowgrpo.models.tiny_flux`: a ``QwenImagePipeline`` (or ``QwenImageEditPipeline``)
built in memory from configs, no hub:

* an offline **Qwen2 byte-level BPE tokenizer**, trained with the ``tokenizers`` library on a small in-code corpus
  (the two prompt templates, frequent prompt words) and wrapped as transformers' ``Qwen2Tokenizer``. The Qwen chat
  special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...) come after the
  BPE vocabulary, as in Qwen's. Every template word is one token, so the templates' system prefixes are exactly as
  long as with Qwen's real tokenizer (34 tokens for Qwen-Image, 64 for Qwen-Image-Edit): the pipelines drop that many
  leading hidden states (``prompt_template_encode_start_idx``, hard-coded there). Any text tokenizes (byte fallback).
* a tiny ``Qwen2_5_VLForConditionalGeneration`` (2 text layers, multimodal rotary sections, a 2-block vision tower),
* a ``QwenImageTransformer2DModel`` (2 blocks), an ``AutoencoderKLQwenImage`` (causal 3-d convs, frame dim 1, Qwen's
  16-channel ``latents_mean``/``latents_std``), and Qwen-Image's dynamic-shift scheduler config,
* for the Edit pipeline, a ``Qwen2VLProcessor`` (the PIL image processor: torchvision is not needed).

Weights are a deterministic function of ``(spec, seed)``.

Usage::

    pipe = build_tiny_qwen_image_pipeline("tiny", seed=0)   # in memory, every component in .eval()
    path = cached_tiny_qwen_image_model("tiny")             # diffusers-format directory, built once
    QwenImagePipeline.from_pretrained(path)                 # works offline
    cached_tiny_qwen_image_model("tiny-edit")               # a QwenImageEditPipeline directory
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .tiny import build_once, default_cache_root, spec_cache_key, write_tiny_marker

if TYPE_CHECKING:  # diffusers takes seconds to import
    from diffusers import QwenImagePipeline

#: bump when the construction code changes in a way that changes the saved model (invalidates caches)
TINY_QWEN_IMAGE_CODE_VERSION = 1

#: the pipelines' prompt templates (diffusers 0.42 ``prompt_template_encode``); their system prefixes must tokenize to
#: ``prompt_template_encode_start_idx`` tokens (34 / 64), which the tokenizer builder checks
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_IMAGE_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
#: (template, tokens of its system prefix up to and including "user\n")
TEMPLATE_PREFIXES: tuple[tuple[str, int], ...] = ((QWEN_IMAGE_TEMPLATE, 34), (QWEN_IMAGE_EDIT_TEMPLATE, 64))

#: Qwen2's special tokens, in Qwen's order (ids follow the BPE vocabulary; ``<|endoftext|>`` is pad/eos/unk)
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

#: frequent prompt words trained into whole-word tokens (short sequences for typical prompts)
_CORPUS_WORDS = (
    "a an the of and with in on at to for from by is are photo image picture painting portrait style art detailed "
    "cat cats dog dogs man woman person people car red blue green yellow black white orange purple pink brown one two "
    "three four five six number change add remove make it them background text sign that this realistic high quality"
)


@dataclass(frozen=True)
class TinyQwenImageSpec:
    """Sizes of a tiny Qwen-Image pipeline. The text encoder's hidden size is the transformer's
    ``joint_attention_dim`` and the vision tower's ``out_hidden_size``; the transformer sees 2x2-packed latents, so
    ``in_channels`` = 4 x ``z_dim``; ``sum(axes_dims_rope)`` = ``head_dim``; ``sum(mrope_section)`` = half the text
    head dim."""

    name: str
    #: build a QwenImageEditPipeline (with a Qwen2VLProcessor) instead of a QwenImagePipeline
    edit: bool = False
    # VAE (Qwen-Image: 16 latent channels, 3 spatial downsamplings -> factor 8, frame dim 1)
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 2, 2, 2)
    vae_num_res_blocks: int = 1
    z_dim: int = 16
    #: default image size in pixels (the adapter's default resolution)
    resolution: int = 64
    # transformer
    num_layers: int = 2
    head_dim: int = 16
    num_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    # text part of Qwen2.5-VL
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    text_intermediate: int = 64
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    # vision part of Qwen2.5-VL (Edit: the source image goes through it)
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    # scheduler: Qwen-Image's (Qwen/Qwen-Image scheduler_config.json)
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float = 0.02

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_dim_mult) - 1)


TINY_QWEN_IMAGE_SPECS: dict[str, TinyQwenImageSpec] = {
    # fast tests: 64 px (a 4 x 4 = 16 token image sequence)
    "tiny": TinyQwenImageSpec(name="tiny"),
    # the same sizes as a QwenImageEditPipeline
    "tiny-edit": TinyQwenImageSpec(name="tiny-edit", edit=True),
}


def get_qwen_image_spec(spec_name: str) -> TinyQwenImageSpec:
    try:
        return TINY_QWEN_IMAGE_SPECS[spec_name]
    except KeyError:
        known = sorted(TINY_QWEN_IMAGE_SPECS)
        raise ValueError(f"unknown tiny Qwen-Image spec {spec_name!r}; known: {known}") from None


# ----------------------------------------------------------------------------------------------- tokenizer


def _training_corpus() -> list[str]:
    """The templates with their special tokens blanked out (special tokens are never merged), plus prompt words."""
    texts = [t.format("") for t, _ in TEMPLATE_PREFIXES]
    for sp in QWEN_SPECIAL_TOKENS:
        texts = [t.replace(sp, "\n") for t in texts]
    return texts + [" ".join(_CORPUS_WORDS.split())]


def build_qwen2_tokenizer():
    """Offline Qwen2 byte-level BPE tokenizer (transformers ``Qwen2Tokenizer``, fast): Qwen's pre-tokenizer (its
    split regex + byte level) and a BPE trained until every corpus word is one token; ids 0..255 are bytes, merged
    tokens follow, then :data:`QWEN_SPECIAL_TOKENS`. Right padding with ``<|endoftext|>``. Deterministic."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_training_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for sp in QWEN_SPECIAL_TOKENS:
        vocab[sp] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, padding_side="right", model_max_length=32768)
    specials = [AddedToken(t, special=True) for t in QWEN_SPECIAL_TOKENS[1:]]
    tok.add_special_tokens({"additional_special_tokens": specials})
    for template, n in TEMPLATE_PREFIXES:
        prefix = template.split("{}")[0].split("<|vision_start|>")[0]
        got = len(tok(prefix).input_ids)
        if got != n:  # the pipelines drop exactly n leading hidden states
            raise RuntimeError(f"tiny Qwen2 tokenizer: template prefix has {got} tokens, the pipeline drops {n}")
    return tok


# ------------------------------------------------------------------------------------------------- models


def _text_encoder(s: TinyQwenImageSpec, tok: Any):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids
    if 2 * sum(s.mrope_section) != s.text_hidden // s.text_heads:
        raise ValueError(f"spec {s.name!r}: 2 x sum(mrope_section) must equal the text head dim")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=s.text_hidden,
            intermediate_size=s.text_intermediate,
            num_hidden_layers=s.text_layers,
            num_attention_heads=s.text_heads,
            num_key_value_heads=s.text_kv_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(s.mrope_section)},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            use_cache=False,
        ),
        vision_config=dict(
            depth=s.vision_depth,
            hidden_size=s.vision_hidden,
            intermediate_size=s.vision_intermediate,
            num_heads=s.vision_heads,
            out_hidden_size=s.text_hidden,
            patch_size=s.patch_size,
            spatial_merge_size=s.spatial_merge_size,
            temporal_patch_size=s.temporal_patch_size,
            window_size=s.patch_size * s.spatial_merge_size * 4,
            fullatt_block_indexes=[s.vision_depth - 1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _processor(s: TinyQwenImageSpec, tok: Any):
    """Qwen2VLProcessor with the PIL image processor and no video processor (no torchvision); images resized to
    multiples of 28 px."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .qwen_image import make_qwen2vl_processor

    factor = s.patch_size * s.spatial_merge_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size, merge_size=s.spatial_merge_size,
        min_pixels=factor * factor, max_pixels=factor * factor * 1280)
    return make_qwen2vl_processor(image_processor, tok)


def build_tiny_qwen_image_pipeline(spec_name: str = "tiny", seed: int = 0) -> "QwenImagePipeline":
    """A random-weight ``QwenImagePipeline`` (``QwenImageEditPipeline`` for an edit spec) of spec ``spec_name``;
    weights are deterministic given ``seed`` (the global torch RNG is left untouched). Every component is in
    ``.eval()``."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    s = get_qwen_image_spec(spec_name)
    if sum(s.axes_dims_rope) != s.head_dim:
        raise ValueError(f"spec {spec_name!r}: sum(axes_dims_rope)={sum(s.axes_dims_rope)} != head_dim={s.head_dim}")
    tok = build_qwen2_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * s.z_dim,
            out_channels=s.z_dim,
            num_layers=s.num_layers,
            attention_head_dim=s.head_dim,
            num_attention_heads=s.num_heads,
            joint_attention_dim=s.text_hidden,
            guidance_embeds=False,
            axes_dims_rope=s.axes_dims_rope,
        )
        vae = AutoencoderKLQwenImage(
            base_dim=s.vae_base_dim,
            z_dim=s.z_dim,
            dim_mult=list(s.vae_dim_mult),
            num_res_blocks=s.vae_num_res_blocks,
            attn_scales=[],
            temperal_downsample=[False] + [True] * (len(s.vae_dim_mult) - 2),
        )
        text_encoder = _text_encoder(s, tok)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=s.base_shift,
        max_shift=s.max_shift,
        base_image_seq_len=s.base_image_seq_len,
        max_image_seq_len=s.max_image_seq_len,
        shift_terminal=s.shift_terminal,
        time_shift_type="exponential",
    )
    for m in (transformer, vae, text_encoder):
        m.eval()
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)
    if s.edit:
        return QwenImageEditPipeline(**parts, processor=_processor(s, tok))
    return QwenImagePipeline(**parts)


def make_tiny_qwen_image_model(out_dir: str | os.PathLike, seed: int = 0, spec_name: str = "tiny") -> Path:
    """Save a complete diffusers-format Qwen-Image pipeline directory plus ``flowgrpo_tiny.json`` (``"family":
    "qwen_image"`` or ``"qwen_image_edit"``); ``QwenImagePipeline.from_pretrained(out_dir)`` (or the Edit pipeline)
    then works offline. Returns ``Path(out_dir)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_qwen_image_spec(spec_name)
    pipe = build_tiny_qwen_image_pipeline(spec_name, seed)
    if spec.edit:
        from .qwen_image import save_edit_pipeline

        save_edit_pipeline(pipe, out)  # its video-less processor cannot save itself
    else:
        pipe.save_pretrained(out, safe_serialization=True)
    write_tiny_marker(out, pipe, spec_name, seed, TINY_QWEN_IMAGE_CODE_VERSION, dataclasses.asdict(spec),
                      spec.resolution, family="qwen_image_edit" if spec.edit else "qwen_image",
                      **({"source_resolution": spec.resolution} if spec.edit else {}))
    return out


def tiny_qwen_image_cache_key(spec_name: str = "tiny", seed: int = 0) -> str:
    """``qwen-image-<spec>-<12 hex>``: hash of the spec's settings, the seed and the code version."""
    return spec_cache_key(f"qwen-image-{spec_name}", "qwen_image", dataclasses.asdict(get_qwen_image_spec(spec_name)),
                          seed, TINY_QWEN_IMAGE_CODE_VERSION)


def cached_tiny_qwen_image_model(spec_name: str = "tiny", cache_dir: str | os.PathLike | None = None,
                                 seed: int = 0) -> Path:
    """The directory of tiny Qwen-Image model ``spec_name``, built on first use as ``<cache_dir>/qwen-image-<spec>-
    <hash>`` (default cache root: :func:`flowgrpo.models.tiny.default_cache_root`). Built atomically
    (:func:`~flowgrpo.models.tiny.build_once`)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return build_once(root / tiny_qwen_image_cache_key(spec_name, seed),
                      lambda d: make_tiny_qwen_image_model(d, seed=seed, spec_name=spec_name))


__all__ = [
    "QWEN_IMAGE_EDIT_TEMPLATE",
    "QWEN_IMAGE_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "TINY_QWEN_IMAGE_SPECS",
    "TinyQwenImageSpec",
    "build_qwen2_tokenizer",
    "build_tiny_qwen_image_pipeline",
    "cached_tiny_qwen_image_model",
    "get_qwen_image_spec",
    "make_tiny_qwen_image_model",
    "tiny_qwen_image_cache_key",
]
