"""CLIP-based rewards: ``aesthetic``, ``clipscore``, ``pickscore`` and ``image_similarity``.

All four load a transformers ``CLIPModel`` (plus its tokenizer and CLIP image processor) from a location that
:func:`flowgrpo.models.loading.resolve_model_path` understands: a local directory, ``file:///dir``,
``s3://bucket/prefix`` or a Hugging Face hub id (``revision=`` pins it). Models are loaded **at construction**
(errors surface when the reward is built, not in the middle of a training step) and put in eval mode; every call
holds a per-reward lock around the model, so one instance may be shared by a thread pool.

Common options: ``model``, ``revision``, ``processor`` (a separate location for tokenizer + image processor;
default: the model's), ``processor_revision``, ``device`` ("cpu", "cuda", "cuda:N" or "auto" = CUDA when available),
``dtype`` ("float32" default, "float16", "bfloat16" or a torch dtype), ``batch_size`` (images per forward pass),
``cache_dir`` (flowgrpo's model cache root, see ``resolve_model_path``).

Preprocessing uses the PIL backend of the CLIP image processor (``CLIPImageProcessorPil`` on transformers 5,
``CLIPImageProcessor`` before): resize shortest edge (bicubic), center crop, rescale, normalise. It needs no
torchvision and matches the slow processor that upstream used.

Scores (per image i, prompt i):

* ``clipscore``: ``logits_per_image[i, i] / 30`` (= 100·cos/30 with OpenAI CLIP's logit scale 100).
  Default ``openai/clip-vit-large-patch14``.
* ``pickscore``: ``exp(logit_scale) · cos(text_i, image_i) / 26``. Model ``yuvalkirstain/PickScore_v1``,
  processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
* ``aesthetic``: LAION "improved aesthetic predictor": the MLP head of :class:`AestheticMLP` on the L2-normalised
  CLIP image embedding (``openai/clip-vit-large-patch14``, 768-d). The head weights come from ``head_path``.
* ``image_similarity``: cos(CLIP image embedding of image i, that of the reference image
  ``metadata[i]["image"]``), in [-1, 1]. The reference may be a file path (str / PathLike), a PIL image or an
  array (uint8 [H, W, 3], or float [H, W, 3] / [3, H, W] in [0, 1]); the key is the ``ref_key`` option.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from flowgrpo.rewards.base import RewardOutput, as_uint8, register

OPENAI_CLIP_L = "openai/clip-vit-large-patch14"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

#: file names looked for when ``head_path`` is a directory (or not given: then in the CLIP model's directory)
AESTHETIC_HEAD_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic_head.safetensors", "aesthetic_head.pth")


# ------------------------------------------------------------------------------------------------- helpers


def image_processor_class():
    """The PIL-backed CLIP image processor class: ``CLIPImageProcessorPil`` (transformers >= 5, no torchvision
    needed) or ``CLIPImageProcessor`` (transformers 4, where it is the PIL/numpy one)."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None -> cuda if available else cpu; anything else -> ``torch.device(device)``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return names[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}") from None


def _resolve(location: str | os.PathLike, revision: str | None, cache_dir: str | os.PathLike | None) -> Path:
    from flowgrpo.models.loading import resolve_model_path

    return resolve_model_path(str(location), revision=revision, cache_dir=cache_dir)


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor on transformers 4 and a ``BaseModelOutputWithPooling`` (projected
    embedding in ``pooler_output``) on transformers 5."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-12)


def to_pil_list(images: np.ndarray | Sequence[np.ndarray]) -> list:
    from PIL import Image

    return [Image.fromarray(im) for im in images]


class ClipBackbone:
    """A ``CLIPModel`` + tokenizer + PIL image processor, loaded from resolved locations, with locked batched
    embedding helpers. ``need_text=False`` skips the tokenizer (image-only rewards)."""

    def __init__(self, model: str | os.PathLike, processor: str | os.PathLike | None = None,
                 revision: str | None = None, processor_revision: str | None = None, device: str = "auto",
                 dtype: str | torch.dtype | None = None, cache_dir: str | os.PathLike | None = None,
                 need_text: bool = True):
        from transformers import AutoTokenizer, CLIPModel

        self.model_dir = _resolve(model, revision, cache_dir)
        if processor is None:
            self.processor_dir = self.model_dir
        else:
            self.processor_dir = _resolve(processor, processor_revision, cache_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = CLIPModel.from_pretrained(str(self.model_dir)).to(self.device, self.dtype).eval()
        self.model.requires_grad_(False)
        self.image_processor = image_processor_class().from_pretrained(str(self.processor_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.processor_dir)) if need_text else None
        self.lock = threading.Lock()

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def max_text_length(self) -> int:
        n = int(self.model.config.text_config.max_position_embeddings)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        return min(n, int(tok_max)) if tok_max else n

    def pixel_values(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        px = self.image_processor(images=to_pil_list(images), return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    def text_inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise RuntimeError("this CLIP backbone was loaded without a tokenizer")
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_text_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (float32, CPU) of uint8 [H, W, 3] images (a batch array or a
        list of arrays of different sizes: the processor resizes each)."""
        out = []
        for i in range(0, len(images), batch_size):
            px = self.pixel_values(images[i:i + batch_size])
            with self.lock:
                emb = _features(self.model.get_image_features(pixel_values=px))
            out.append(_normalize(emb.float()).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] (float32, CPU)."""
        out = []
        for i in range(0, len(prompts), batch_size):
            enc = self.text_inputs(prompts[i:i + batch_size])
            with self.lock:
                emb = _features(self.model.get_text_features(**enc))
            out.append(_normalize(emb.float()).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().cpu())


def _check_lengths(images: np.ndarray, prompts: Sequence[str] | None, metadata: Sequence[dict] | None) -> None:
    n = len(images)
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) not in (0, n):
        raise ValueError(f"got {n} images but {len(metadata)} metadata entries")


# ----------------------------------------------------------------------------------------------- clipscore


@register("clipscore")
class ClipScore:
    """``logits_per_image`` diagonal / 30 (OpenAI CLIP: 100·cos(text, image) / 30)."""

    name = "clipscore"

    def __init__(self, model: str = OPENAI_CLIP_L, revision: str | None = None, processor: str | None = None,
                 processor_revision: str | None = None, device: str = "auto", dtype: str | torch.dtype | None = None,
                 batch_size: int = 32, cache_dir: str | os.PathLike | None = None, scale: float = 30.0):
        self.clip = ClipBackbone(model, processor, revision, processor_revision, device, dtype, cache_dir)
        self.batch_size = int(batch_size)
        self.scale = float(scale)

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> RewardOutput:
        images = as_uint8(images)
        _check_lengths(images, prompts, None)
        scores = []
        for i in range(0, len(images), self.batch_size):
            px = self.clip.pixel_values(images[i:i + self.batch_size])
            enc = self.clip.text_inputs(prompts[i:i + self.batch_size])
            with self.clip.lock:
                out = self.clip.model(pixel_values=px, **enc)
            scores.append(out.logits_per_image.float().diagonal().cpu() / self.scale)
        s = torch.cat(scores).double().numpy() if scores else np.zeros(0)
        return RewardOutput(s, [{} for _ in s])


# ----------------------------------------------------------------------------------------------- pickscore


@register("pickscore")
class PickScore:
    """``exp(logit_scale) · cos(text, image) / 26`` with the PickScore_v1 CLIP-H model."""

    name = "pickscore"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR,
                 revision: str | None = None, processor_revision: str | None = None, device: str = "auto",
                 dtype: str | torch.dtype | None = None, batch_size: int = 32,
                 cache_dir: str | os.PathLike | None = None, scale: float = 26.0):
        self.clip = ClipBackbone(model, processor, revision, processor_revision, device, dtype, cache_dir)
        self.batch_size = int(batch_size)
        self.scale = float(scale)

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> RewardOutput:
        images = as_uint8(images)
        _check_lengths(images, prompts, None)
        img = self.clip.image_embeds(images, self.batch_size)
        txt = self.clip.text_embeds(prompts, self.batch_size)
        cos = (img * txt).sum(-1).double()
        s = (self.clip.logit_scale() * cos / self.scale).numpy()
        return RewardOutput(s, [{"cos": float(c)} for c in cos])


# ----------------------------------------------------------------------------------------------- aesthetic


class AestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor head. ``nn.Sequential`` indices match the public checkpoint
    (``sac+logos+ava1-l14-linearMSE.pth``), whose state dict keys are exactly::

        layers.0.weight [1024, D]  layers.0.bias [1024]     Linear(D, 1024)   (1: Dropout 0.2)
        layers.2.weight [128, 1024] layers.2.bias [128]     Linear(1024, 128) (3: Dropout 0.2)
        layers.4.weight [64, 128]   layers.4.bias [64]      Linear(128, 64)   (5: Dropout 0.1)
        layers.6.weight [16, 64]    layers.6.bias [16]      Linear(64, 16)
        layers.7.weight [1, 16]     layers.7.bias [1]       Linear(16, 1)

    with D = 768 for CLIP ViT-L/14. There are no activations (the public predictor is a stack of linear
    layers); dropouts are inactive in eval mode."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.input_dim = int(input_dim)
        self.layers = nn.Sequential(
            nn.Linear(self.input_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


def expected_aesthetic_keys() -> list[str]:
    return [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``.pth``/``.pt``/``.bin``; loaded with
    ``weights_only=True``: plain tensors only)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    sd = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{p}: expected a state dict, got {type(sd).__name__}")
    return sd


def normalize_aesthetic_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the public layout (``layers.N.*``) and wrappers that prefix it (``mlp.layers.N.*``,
    ``module.layers.N.*``): the prefix up to ``layers.`` is dropped. Anything else is left for the strict load to
    report."""
    out = {}
    for k, v in sd.items():
        j = k.find("layers.")
        out[k[j:] if j > 0 else k] = v
    return out


def _find_head_file(directory: Path) -> Path | None:
    for name in AESTHETIC_HEAD_FILES:
        if (directory / name).is_file():
            return directory / name
    cands = sorted(p for ext in ("*.pth", "*.pt", "*.safetensors") for p in directory.glob(ext)
                   if p.name != "model.safetensors")
    return cands[0] if len(cands) == 1 else None


def resolve_head_path(head_path: str | os.PathLike | None, model_dir: Path, revision: str | None,
                      cache_dir: str | os.PathLike | None) -> Path:
    """``head_path``: a file (``.pth``/``.pt``/``.safetensors``, plain path or ``file://``), or a location of a
    directory (local, s3://, hub id) holding one of :data:`AESTHETIC_HEAD_FILES` (or a single .pth/.pt/.safetensors).
    None: look in the CLIP model's directory."""
    if head_path is None:
        found = _find_head_file(model_dir)
        if found is None:
            raise FileNotFoundError(
                "aesthetic: no head_path given and no aesthetic head file in the CLIP model directory "
                f"{model_dir} (looked for {', '.join(AESTHETIC_HEAD_FILES)}). Pass head_path= pointing to the LAION "
                "improved-aesthetic-predictor state dict 'sac+logos+ava1-l14-linearMSE.pth' (keys "
                "layers.{0,2,4,6,7}.{weight,bias}) or a directory / s3:// prefix holding it.")
        return found
    s = str(head_path)
    if s.startswith("file://"):
        from urllib.parse import unquote, urlparse

        s = unquote(urlparse(s).path)
    p = Path(s).expanduser()
    if p.is_file():
        return p
    directory = p if p.is_dir() else _resolve(s, revision, cache_dir)
    found = _find_head_file(directory)
    if found is None:
        raise FileNotFoundError(f"aesthetic: no head file in {directory} (looked for {', '.join(AESTHETIC_HEAD_FILES)}"
                                " or a single .pth/.pt/.safetensors)")
    return found


@register("aesthetic")
class AestheticScore:
    """LAION improved aesthetic predictor on L2-normalised CLIP ViT-L/14 image embeddings (roughly 1..10).

    Options: the common ones, plus ``head_path`` (see :func:`resolve_head_path`) and ``head_revision`` (for a hub
    id head location)."""

    name = "aesthetic"

    def __init__(self, model: str = OPENAI_CLIP_L, head_path: str | os.PathLike | None = None,
                 revision: str | None = None, head_revision: str | None = None, processor: str | None = None,
                 processor_revision: str | None = None, device: str = "auto",
                 dtype: str | torch.dtype | None = None, batch_size: int = 32,
                 cache_dir: str | os.PathLike | None = None):
        self.clip = ClipBackbone(model, processor, revision, processor_revision, device, dtype, cache_dir,
                                 need_text=False)
        self.head_file = resolve_head_path(head_path, self.clip.model_dir, head_revision, cache_dir)
        sd = normalize_aesthetic_keys(load_state_dict_file(self.head_file))
        w0 = sd.get("layers.0.weight")
        if w0 is None or w0.ndim != 2:
            raise ValueError(f"aesthetic head {self.head_file}: missing 'layers.0.weight'; expected keys "
                             f"{expected_aesthetic_keys()}, got {sorted(sd)}")
        if w0.shape[1] != self.clip.embed_dim:
            raise ValueError(f"aesthetic head {self.head_file} expects {w0.shape[1]}-d embeddings but the CLIP model "
                             f"{self.clip.model_dir} produces {self.clip.embed_dim}-d ones")
        self.head = AestheticMLP(self.clip.embed_dim)
        try:
            self.head.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"aesthetic head {self.head_file} does not match the predictor layout "
                             f"{expected_aesthetic_keys()}: {e}") from e
        self.head = self.head.to(self.clip.device, torch.float32).eval().requires_grad_(False)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str] | None = None,
                 metadata: Sequence[dict] = ()) -> RewardOutput:
        images = as_uint8(images)
        emb = self.clip.image_embeds(images, self.batch_size)
        with self.clip.lock:
            s = self.head(emb.to(self.clip.device)).squeeze(-1).double().cpu().numpy()
        return RewardOutput(s, [{} for _ in s])


# ---------------------------------------------------------------------------------------- image_similarity


def load_reference_image(ref: Any) -> np.ndarray:
    """uint8 [H, W, 3] from a path (str / PathLike / ``file://``), a PIL image or an array (uint8 HWC, or float
    in [0, 1] HWC / CHW, or a torch tensor)."""
    from PIL import Image

    if isinstance(ref, (str, os.PathLike)):
        s = str(ref)
        if s.startswith("file://"):
            from urllib.parse import unquote, urlparse

            s = unquote(urlparse(s).path)
        with Image.open(s) as im:
            return np.asarray(im.convert("RGB"))
    if isinstance(ref, Image.Image):
        return np.asarray(ref.convert("RGB"))
    if hasattr(ref, "detach"):
        ref = ref.detach().cpu().numpy()
    arr = np.asarray(ref)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3:
        raise ValueError(f"reference image must be [H, W, 3] or [3, H, W], got shape {arr.shape}")
    return as_uint8(arr[None])[0]


@register("image_similarity")
class ImageSimilarity:
    """cos(CLIP image embedding of the output, that of the reference image in ``metadata[i][ref_key]``) in [-1, 1].
    Default model ``openai/clip-vit-large-patch14``."""

    name = "image_similarity"

    def __init__(self, model: str = OPENAI_CLIP_L, revision: str | None = None, processor: str | None = None,
                 processor_revision: str | None = None, device: str = "auto", dtype: str | torch.dtype | None = None,
                 batch_size: int = 32, cache_dir: str | os.PathLike | None = None, ref_key: str = "image"):
        self.clip = ClipBackbone(model, processor, revision, processor_revision, device, dtype, cache_dir,
                                 need_text=False)
        self.batch_size = int(batch_size)
        self.ref_key = ref_key

    @torch.no_grad()
    def __call__(self, images: Any, prompts: Sequence[str] | None, metadata: Sequence[dict]) -> RewardOutput:
        images = as_uint8(images)
        n_meta = 0 if metadata is None else len(metadata)
        if n_meta != len(images):
            raise ValueError(f"image_similarity needs one metadata dict per image with the reference image under "
                             f"{self.ref_key!r}; got {n_meta} for {len(images)} images")
        refs = []
        for i, md in enumerate(metadata):
            if not isinstance(md, dict) or md.get(self.ref_key) is None:
                raise ValueError(f"image_similarity: metadata[{i}] has no reference image under {self.ref_key!r}")
            refs.append(load_reference_image(md[self.ref_key]))
        out_emb = self.clip.image_embeds(images, self.batch_size)
        ref_emb = self.clip.image_embeds(refs, self.batch_size)  # sizes may differ: the processor resizes each
        s = (out_emb * ref_emb).sum(-1).clamp(-1.0, 1.0).double().numpy()
        return RewardOutput(s, [{} for _ in s])


__all__ = ["AESTHETIC_HEAD_FILES", "AestheticMLP", "AestheticScore", "ClipBackbone", "ClipScore", "ImageSimilarity",
           "PickScore", "expected_aesthetic_keys", "image_processor_class", "load_reference_image", "resolve_device",
           "resolve_dtype"]
