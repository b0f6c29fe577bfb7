"""Offline tiny Stable Diffusion 3 pipelines (random weights) for development, tests and CPU benchmarks.

Everything is built in memory from configs: no files, no Hugging Face hub. The tokenizers are character
level (CLIP: the 256 byte-level symbols, T5: printable ASCII/Latin-1 characters), so any English prompt
tokenizes. Weights are a deterministic function of ``(spec, seed)``.

Usage::

    pipe = build_tiny_pipeline("tiny", seed=0)           # in memory, every component in .eval()
    path = cached_tiny_model("tiny")                      # diffusers-format directory, built once
    StableDiffusion3Pipeline.from_pretrained(path)        # works offline
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:  # heavy imports (diffusers takes seconds) stay lazy
    from diffusers import StableDiffusion3Pipeline

#: bump when the construction code changes in a way that changes the saved model (invalidates caches)
TINY_CODE_VERSION = 1
#: name of the marker file written into every tiny model directory
TINY_MARKER = "flowgrpo_tiny.json"


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny SD3 pipeline. ``pooled_projection_dim`` is 2 x ``clip_projection_dim`` (SD3 concatenates
    the two pooled CLIP outputs); the T5 ``d_model`` is ``joint_attention_dim``; the transformer's hidden size
    (``num_heads * head_dim``) is also the caption projection size, as in SD3."""

    name: str
    # VAE
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # 4 blocks -> vae_scale_factor 8
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 4
    latent_channels: int = 16
    shift_factor: float = 0.0609
    scaling_factor: float = 1.5035
    # transformer
    sample_size: int = 8  # latent size of the default resolution (x8 = pixels)
    patch_size: int = 2
    num_layers: int = 2
    head_dim: int = 8
    num_heads: int = 4
    joint_attention_dim: int = 32
    pos_embed_max_size: int = 32
    # text encoders
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_heads: int = 4
    clip_intermediate: int = 64
    clip_projection_dim: int = 32
    t5_layers: int = 2
    t5_heads: int = 4
    t5_d_kv: int = 8
    t5_d_ff: int = 64
    # scheduler
    shift: float = 3.0
    # tokenizers (defaults = the generic character-level tokenizers; see :func:`build_clip_tokenizer`)
    #: CLIP sequence length (``model_max_length``; SD3 pads every CLIP sequence to it)
    clip_max_length: int = 77
    #: extra whole-word tokens: CLIP merges and T5 ``▁word`` pieces (a small closed prompt vocabulary then
    #: tokenizes to one token per word, so short sequences suffice)
    vocab_words: tuple[str, ...] = ()

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def pooled_projection_dim(self) -> int:
        return 2 * self.clip_projection_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def resolution(self) -> int:
        """Default image size in pixels."""
        return self.sample_size * self.vae_scale_factor


#: every word of the shapes-world prompts (:mod:`flowgrpo.eval.shapes`): one token each in the ``shapes`` spec
SHAPES_WORDS: tuple[str, ...] = (
    "a", "above", "an", "and", "below", "black", "blue", "circle", "circles", "four", "green", "left", "of", "orange",
    "photo", "purple", "red", "right", "square", "squares", "three", "triangle", "triangles", "two", "white", "yellow",
)

TINY_SPECS: dict[str, TinySpec] = {
    # fast tests: 64 px, ~82k transformer params
    "tiny": TinySpec(name="tiny"),
    # CPU benchmark: ~9.3M transformer params (4 layers, 8 heads x 32 = 256 hidden), 128 px default,
    # pos_embed_max_size 32 covers up to 512 px. Text encoders ~1.3M params in all.
    "bench_cpu": TinySpec(
        name="bench_cpu",
        sample_size=16,
        num_layers=4,
        head_dim=32,
        num_heads=8,
        joint_attention_dim=256,
        pos_embed_max_size=32,
        clip_hidden=128,
        clip_layers=2,
        clip_heads=4,
        clip_intermediate=256,
        clip_projection_dim=128,
        t5_layers=2,
        t5_heads=4,
        t5_d_kv=64,
        t5_d_ff=512,
    ),
    # the shapes-world base model (flowgrpo.models.pretrain): a 4x VAE with 8 latent channels (64 px -> 16 x 16 x 8,
    # 64 image tokens at patch 2), a 4-block MM-DiT with 128 hidden (~0.9M params), word-level tokenizers with
    # 16-token CLIP sequences (use model.max_sequence_length=16 for T5 too). Random weights until pretrained.
    "shapes": TinySpec(
        name="shapes",
        vae_channels=(8, 16, 16),
        latent_channels=8,
        sample_size=16,
        num_layers=4,
        head_dim=32,
        num_heads=4,
        joint_attention_dim=64,
        pos_embed_max_size=32,
        clip_hidden=32,
        clip_projection_dim=32,
        t5_d_kv=16,
        t5_d_ff=128,
        clip_max_length=16,
        vocab_words=SHAPES_WORDS,
    ),
}


def get_spec(spec_name: str) -> TinySpec:
    try:
        return TINY_SPECS[spec_name]
    except KeyError:
        raise ValueError(f"unknown tiny spec {spec_name!r}; known: {sorted(TINY_SPECS)}") from None


# ----------------------------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte -> printable unicode char table (what ``ByteLevel`` pre-tokenizes to)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


#: whole-word CLIP merges for frequent prompt words, so typical prompts stay well under CLIP's 77 tokens
_CLIP_WORDS = (
    "the and with of in on at to for from by is are an photo image picture painting portrait style art detailed "
    "cat dog man woman person people car red blue green yellow black white orange purple pink brown two three "
    "four a background text sign that this realistic high quality"
).split()


def _clip_merges(words: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that build each word (as ``word</w>``) from its characters (ASCII words only).
    Longer words come first (lower rank = higher priority), so a short word's merge (e.g. "to") does not
    split a longer one ("photo")."""
    merges: list[tuple[str, str]] = []
    for w in sorted(set(words), key=lambda w: (-len(w), w)):
        if len(w) < 2:
            continue
        left = w[0]
        for i, ch in enumerate(w[1:], start=1):
            right = ch + "</w>" if i == len(w) - 1 else ch
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
    return merges


def build_clip_tokenizer(model_max_length: int = 77, extra_words: tuple[str, ...] | list[str] = ()):
    """Byte-level CLIP BPE tokenizer: every byte is a token (with and without ``</w>``), plus whole-word merges
    for ~60 frequent prompt words. ``extra_words``: whole-word merges ranked before the default ones, so each of
    them is one token (the ids of the merged tokens then differ from the default tokenizer's).

    Ids: 0..255 bytes, 256..511 bytes+``</w>``, 512 ``<|startoftext|>``, 513 ``<|endoftext|>`` (also pad/unk),
    then the merged tokens. Lowercases (as CLIP does)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    merges = _clip_merges(_CLIP_WORDS)
    if extra_words:  # ranked first, so no default merge can split them (e.g. "qu" of "quality" in "square")
        extra = _clip_merges([w.lower() for w in extra_words])
        merges = extra + [m for m in merges if m not in extra]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(extra_words: tuple[str, ...] | list[str] = ()):
    """Character-level T5 (unigram) tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``▁`` and every
    printable ASCII / Latin-1 char with and without the ``▁`` word prefix (prefixed pieces score higher, so a word
    is ``▁h e l l o``). Case preserving; no sentinel (extra_id) tokens. ``extra_words``: whole-word pieces
    ``▁word`` appended after those (they outscore any spelling, so each such word is one token)."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 256)]
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    vocab += [("▁" + c, -2.0) for c in chars] + [(c, -3.0) for c in chars]
    known = {piece for piece, _ in vocab}
    for w in dict.fromkeys(extra_words):
        if len(w) > 1 and "▁" + w not in known:
            vocab.append(("▁" + w, -1.0))
            known.add("▁" + w)
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tokenizers(spec: TinySpec):
    """(CLIP, T5) tokenizers of a spec."""
    return (build_clip_tokenizer(spec.clip_max_length, spec.vocab_words), build_t5_tokenizer(spec.vocab_words))


# ------------------------------------------------------------------------------------------------ pipeline


def tiny_sd_vae(s: Any):
    """An SD-style ``AutoencoderKL`` (SD3, FLUX) from a spec's ``vae_*``, ``latent_channels``, ``resolution``,
    ``scaling_factor`` and ``shift_factor``; random weights from the current torch RNG."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(s.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(s.vae_channels),
        block_out_channels=s.vae_channels,
        layers_per_block=s.vae_layers_per_block,
        latent_channels=s.latent_channels,
        norm_num_groups=s.vae_norm_groups,
        sample_size=s.resolution,
        scaling_factor=s.scaling_factor,
        shift_factor=s.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_clip_config(s: Any, tok: Any, **extra: Any):
    """A ``CLIPTextConfig`` from a spec's ``clip_*`` sizes and the offline tokenizer ``tok`` (``extra``: e.g. SD3's
    ``projection_dim``)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=s.clip_hidden,
        intermediate_size=s.clip_intermediate,
        num_hidden_layers=s.clip_layers,
        num_attention_heads=s.clip_heads,
        max_position_embeddings=tok.model_max_length,
        **extra,
        hidden_act="gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,  # != 2, so pooling takes the first eos position
        pad_token_id=tok.pad_token_id,
    )


def tiny_t5_config(s: Any, tok: Any, d_model: int, config_class: Any = None):
    """An encoder-only T5 config (``config_class``: ``T5Config`` by default, Wan's ``UMT5Config``) from a spec's
    ``t5_*`` sizes, the offline tokenizer ``tok`` and the model width ``d_model``."""
    if config_class is None:
        from transformers import T5Config as config_class

    return config_class(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=s.t5_d_kv,
        d_ff=s.t5_d_ff,
        num_layers=s.t5_layers,
        num_heads=s.t5_heads,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )


def write_tiny_marker(out: Path, pipe: Any, spec_name: str, seed: int, code_version: int, settings: dict[str, Any],
                      resolution: int, **extra: Any) -> None:
    """``<out>/flowgrpo_tiny.json``: what a tiny model is (``extra`` first, e.g. its family), for loaders and caches."""
    info = {**extra, "spec": spec_name, "seed": seed, "code_version": code_version, "resolution": resolution,
            "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()), "settings": settings}
    (out / TINY_MARKER).write_text(json.dumps(info, indent=2) + "\n")


def build_tiny_pipeline(spec_name: str = "tiny", seed: int = 0) -> "StableDiffusion3Pipeline":
    """A random-weight SD3 pipeline of spec ``spec_name``; weights are deterministic given ``seed`` (the global
    torch RNG is left untouched). Every component is in ``.eval()`` (T5 dropout would otherwise make outputs
    nondeterministic)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    s = get_spec(spec_name)
    tok, tok3 = _tokenizers(s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=s.sample_size,
            patch_size=s.patch_size,
            in_channels=s.latent_channels,
            out_channels=s.latent_channels,
            num_layers=s.num_layers,
            attention_head_dim=s.head_dim,
            num_attention_heads=s.num_heads,
            joint_attention_dim=s.joint_attention_dim,
            caption_projection_dim=s.hidden,
            pooled_projection_dim=s.pooled_projection_dim,
            pos_embed_max_size=s.pos_embed_max_size,
        )
        vae = tiny_sd_vae(s)
        clip_cfg = tiny_clip_config(s, tok, projection_dim=s.clip_projection_dim)
        text_encoder = CLIPTextModelWithProjection(clip_cfg)
        text_encoder_2 = CLIPTextModelWithProjection(clip_cfg)
        t5_cfg = tiny_t5_config(s, tok3, s.joint_attention_dim)
        text_encoder_3 = T5EncoderModel(t5_cfg)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s.shift)
    for m in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        m.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=_tokenizers(s)[0],
        text_encoder_3=text_encoder_3,
        tokenizer_3=tok3,
    )


def make_tiny_model(out_dir: str | os.PathLike, spec_name: str = "tiny", seed: int = 0) -> Path:
    """Save a complete diffusers-format SD3 pipeline directory (``model_index.json`` + one folder per component)
    plus ``flowgrpo_tiny.json`` describing it; ``StableDiffusion3Pipeline.from_pretrained(out_dir)`` then works
    offline. Returns ``Path(out_dir)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_spec(spec_name)
    pipe = build_tiny_pipeline(spec_name, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    write_tiny_marker(out, pipe, spec_name, seed, TINY_CODE_VERSION, dataclasses.asdict(spec), spec.resolution)
    return out


#: spec fields added after the first caches were written: left out of the key while at their default, so the
#: keys (and cached directories) of the older specs stay valid
_LATE_FIELDS = {"clip_max_length": 77, "vocab_words": ()}


def spec_settings(spec: TinySpec) -> dict:
    """The spec's settings as hashed into cache keys (late fields only when they differ from their default)."""
    out = dataclasses.asdict(spec)
    for name, default in _LATE_FIELDS.items():
        if out[name] == default:
            del out[name]
    return out


def tiny_cache_key(spec_name: str, seed: int = 0) -> str:
    """``<spec>-<12 hex>``: hash of the spec's settings, the seed and :data:`TINY_CODE_VERSION`."""
    payload = json.dumps(
        {"spec": spec_settings(get_spec(spec_name)), "seed": seed, "code": TINY_CODE_VERSION}, sort_keys=True
    )
    return f"{spec_name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def default_cache_root() -> Path:
    """``$FLOWGRPO_CACHE/models`` if ``FLOWGRPO_CACHE`` is set, else ``~/.cache/flowgrpo/models``."""
    from flowgrpo.storage import cache_root

    return cache_root() / "models"


def spec_cache_key(prefix: str, family: str, spec: dict[str, Any], seed: int, code_version: int) -> str:
    """``<prefix>-<12 hex>``: a hash of a tiny model family's spec settings, seed and construction-code version (the
    cache key of :func:`build_once` directories; any change rebuilds)."""
    payload = json.dumps({"family": family, "spec": spec, "seed": seed, "code": code_version}, sort_keys=True)
    return f"{prefix}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def build_once(final: str | os.PathLike, build: Callable[[Path], Any], marker: str = TINY_MARKER) -> Path:
    """``final`` once it holds ``marker``; else ``build(tmp)`` into a temp dir beside it, then ``os.replace`` it to
    ``final``, so concurrent callers never see a half-written model (the loser of a race keeps the winner's)."""
    final = Path(final)
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race (final exists and is not empty)
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_tiny_model(spec_name: str = "tiny", cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The directory of tiny model ``spec_name``, built on first use under ``cache_dir`` (default
    :func:`default_cache_root`) as ``<cache_dir>/<spec>-<hash>`` (:func:`build_once`)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return build_once(root / tiny_cache_key(spec_name, seed), lambda d: make_tiny_model(d, spec_name, seed))


def param_counts(spec_name: str, seed: int = 0) -> dict[str, int]:
    """Parameter count of every model component of spec ``spec_name``."""
    pipe = build_tiny_pipeline(spec_name, seed)
    names = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    return {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in names}


__all__ = [
    "TINY_SPECS",
    "TinySpec",
    "build_clip_tokenizer",
    "build_once",
    "build_t5_tokenizer",
    "build_tiny_pipeline",
    "cached_tiny_model",
    "make_tiny_model",
    "param_counts",
    "spec_cache_key",
    "tiny_cache_key",
]


if __name__ == "__main__":  # python -m flowgrpo.models.tiny: parameter counts of every spec
    for _name in TINY_SPECS:
        print(_name, TINY_SPECS[_name].resolution, "px", param_counts(_name))
