"""``imagereward``: ImageReward-v1.0 (BLIP-based human-preference reward, roughly −2…2) via the ``image-reward``
package, as upstream does: per image ``model.score(prompt, pil_image)`` (the same number as
``inference_rank(prompt, [image])``).

Status in this build: **not installable alongside the project's stack**. ``image-reward`` 1.5 (the last release)
pins ``timm==0.6.13`` (which requires torchvision, and so a matching torch build) and ``fairscale==0.4.13``, and
pulls ``datasets``; its ``import ImageReward`` also imports torchvision, diffusers, accelerate and datasets (its
ReFL trainer module), and its BLIP text encoder (``models/BLIP/med.py``) uses transformers 4.x internals
(``transformers.modeling_utils.apply_chunking_to_forward`` and friends) that transformers 5 removed. The wrapper
below is real and is exercised in tests with a stand-in module; in an environment with ``image-reward`` and its
dependencies (e.g. a separate reward-server env with torch 2.1 + torchvision + transformers 4.x) it loads the
real model. Where the package cannot be imported, construction raises :class:`RewardUnavailableError` saying what
is missing.

Options:

* ``model``: ``"ImageReward-v1.0"`` (the package downloads ``THUDM/ImageReward`` files into ``download_root``), a
  checkpoint file (``ImageReward.pt``), or a location (local dir, ``file://``, ``s3://`` prefix, hub id; resolved
  by :func:`flowgrpo.models.loading.resolve_model_path` with ``revision``) of a directory holding
  ``ImageReward.pt`` and ``med_config.json``.
* ``med_config``: the BLIP text-encoder config json (default: ``med_config.json`` next to the checkpoint, else the
  package downloads it).
* ``download_root``: where the package caches its downloads (default ``~/.cache/ImageReward``).
* ``device`` ("auto" default, "cpu", "cuda[:N]"), ``batch_size`` (accepted for a uniform interface; upstream
  scores one image at a time).

Note that even with a local checkpoint the package's BLIP builds its tokenizer with
``BertTokenizer.from_pretrained("bert-base-uncased")``, which needs that tokenizer in the Hugging Face cache.
The model is loaded at construction; calls hold a lock around the model (thread-pool safe).
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flowgrpo.rewards.base import RewardOutput, as_uint8, register

DEFAULT_MODEL = "ImageReward-v1.0"
CHECKPOINT_NAME = "ImageReward.pt"
MED_CONFIG_NAME = "med_config.json"


class RewardUnavailableError(RuntimeError):
    """A reward's backend cannot be loaded in this environment."""


def _import_image_reward():
    try:
        return importlib.import_module("ImageReward")
    except Exception as e:  # ImportError, or transformers-5 incompatibilities raised at import time
        raise RewardUnavailableError(
            "the 'imagereward' reward needs the 'image-reward' package (import name 'ImageReward'), which could not "
            f"be imported: {type(e).__name__}: {e}. image-reward 1.5 requires timm==0.6.13 (needs torchvision and a "
            "matching torch), fairscale==0.4.13, datasets, diffusers and transformers 4.x internals removed in "
            "transformers 5, so it is not installed in this build. Run it in a separate environment (e.g. a reward "
            "server: build_reward('imagereward', url=...)) or drop 'imagereward' from the reward weights."
        ) from e


def _resolve_checkpoint(model: str, revision: str | None, med_config: str | None,
                        cache_dir: str | os.PathLike | None) -> tuple[str, str | None]:
    """(name-or-checkpoint-file, med_config) for ``ImageReward.load``."""
    if model == DEFAULT_MODEL:
        return model, med_config
    p = Path(str(model)).expanduser()
    if p.is_file():
        mc = med_config or (str(p.parent / MED_CONFIG_NAME) if (p.parent / MED_CONFIG_NAME).is_file() else None)
        return str(p), mc
    from flowgrpo.models.loading import resolve_model_path

    d = resolve_model_path(str(model), revision=revision, cache_dir=cache_dir)
    ckpt = d / CHECKPOINT_NAME
    if not ckpt.is_file():
        cands = sorted(d.glob("*.pt")) + sorted(d.glob("*.pth"))
        if len(cands) != 1:
            raise FileNotFoundError(f"imagereward: no {CHECKPOINT_NAME} (or single .pt/.pth) in {d}")
        ckpt = cands[0]
    mc = med_config or (str(d / MED_CONFIG_NAME) if (d / MED_CONFIG_NAME).is_file() else None)
    return str(ckpt), mc


@register("imagereward")
class ImageRewardScore:
    """ImageReward-v1.0 through the ``image-reward`` package (see the module docstring)."""

    name = "imagereward"

    def __init__(self, model: str = DEFAULT_MODEL, revision: str | None = None, med_config: str | None = None,
                 download_root: str | None = None, device: str = "auto", batch_size: int = 1,
                 cache_dir: str | os.PathLike | None = None):
        rm = _import_image_reward()  # fail fast, before any download
        import torch

        if device is None or str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = str(device)
        self.batch_size = int(batch_size)
        name, mc = _resolve_checkpoint(model, revision, med_config, cache_dir)
        kwargs: dict[str, Any] = {"device": self.device}
        if download_root is not None:
            kwargs["download_root"] = str(download_root)
        if mc is not None:
            kwargs["med_config"] = mc
        self.model = rm.load(name, **kwargs)
        if hasattr(self.model, "eval"):
            self.model.eval()
        self._lock = threading.Lock()

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> RewardOutput:
        import torch
        from PIL import Image

        images = as_uint8(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        scores = []
        with torch.no_grad():
            for image, prompt in zip(images, prompts, strict=True):
                with self._lock:
                    s = self.model.score(prompt, Image.fromarray(image))
                scores.append(float(np.asarray(s, dtype=np.float64).reshape(-1)[0]))
        return RewardOutput(np.asarray(scores, dtype=np.float64), [{} for _ in scores])


__all__ = ["ImageRewardScore", "RewardUnavailableError"]
