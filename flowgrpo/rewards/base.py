"""The reward interface, the registry by name and the weighted combination.

A reward is a callable ``reward(images, prompts, metadata) -> RewardOutput`` on a batch:
images uint8 [N, H, W, 3] (numpy), prompts list[str] (N), metadata list[dict] (N, per-prompt data such as
GenEval's ``include`` clauses). It returns per-image scores (and optional per-image details).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

#: every reward name a config may use (the upstream zoo); ``REGISTRY`` holds those available in this build
KNOWN_REWARDS = frozenset({
    "jpeg_compressibility", "jpeg_incompressibility", "ocr", "pickscore", "clipscore", "aesthetic",
    "imagereward", "geneval", "unifiedreward", "qwenvl", "deqa", "image_similarity", "shapes",
})


#: metadata key of the reference image a reward compares with (an edit's source image: flowgrpo.edit.SOURCE_KEY)
REFERENCE_KEY = "image"
#: rewards that read ``metadata[REFERENCE_KEY]``; over HTTP the reference travels inline as a ``data:image/...``
#: URI (the client inlines local files, the server opens no path a request names)
REFERENCE_REWARDS = frozenset({"image_similarity"})


@dataclass
class RewardOutput:
    scores: np.ndarray  # [N] float64
    details: list[dict[str, Any]] = field(default_factory=list)  # [N] optional per-image details


class Reward(Protocol):
    name: str

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput: ...


#: the module that registers each reward, imported on first use: reading a config (which checks reward names
#: against KNOWN_REWARDS) must not import torch, transformers or OCR models
_PROVIDERS = {
    "jpeg_compressibility": "jpeg", "jpeg_incompressibility": "jpeg", "ocr": "ocr",
    "pickscore": "clip_rewards", "clipscore": "clip_rewards", "aesthetic": "clip_rewards",
    "image_similarity": "clip_rewards", "imagereward": "imagereward", "geneval": "geneval",
    "unifiedreward": "vlm", "qwenvl": "vlm", "shapes": "shapes",
}


class _LazyRegistry(dict):
    """name -> factory; a name's module is imported the first time the name is looked up, and listing the
    registry imports them all."""

    def _load(self, name: str) -> None:
        mod = _PROVIDERS.get(name)
        if mod:
            import importlib

            importlib.import_module(f"flowgrpo.rewards.{mod}")

    def __contains__(self, name: object) -> bool:
        if not dict.__contains__(self, name) and isinstance(name, str):
            self._load(name)
        return dict.__contains__(self, name)

    def __missing__(self, name: str) -> Callable[..., Reward]:
        self._load(name)
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        raise KeyError(name)

    def __iter__(self):
        for name in _PROVIDERS:
            self._load(name)
        return dict.__iter__(self)

    def keys(self):
        iter(self)
        return dict.keys(self)


REGISTRY: dict[str, Callable[..., Reward]] = _LazyRegistry()


def as_uint8(images: Any) -> np.ndarray:
    """Accept uint8 numpy [N, H, W, 3], a list of such, or a float tensor/array [N, 3, H, W] in [0, 1];
    return uint8 numpy [N, H, W, 3]."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    if hasattr(images, "detach"):  # torch tensor
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must be a batch [N, H, W, 3] or [N, 3, H, W], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.shape[1] == 3 and arr.shape[-1] != 3:
            arr = arr.transpose(0, 2, 3, 1)
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.shape[-1] != 3:
        raise ValueError(f"images must have 3 channels last after conversion, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def register(name: str) -> Callable:
    """Class/factory decorator: ``@register("ocr")`` makes ``build_reward("ocr")`` construct it."""
    if name not in KNOWN_REWARDS:
        raise ValueError(f"register({name!r}): add the name to KNOWN_REWARDS first")

    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        REGISTRY[name] = factory
        return factory

    return deco


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Construct reward ``name`` with its options. ``url=...`` (a reward server) returns the HTTP client
    reward for that name instead of the in-process model."""
    if "url" in kwargs:
        from flowgrpo.rewards.remote import RemoteReward

        return RemoteReward(name, **kwargs)
    if name not in REGISTRY:
        if name in KNOWN_REWARDS:
            raise ValueError(f"reward {name!r} is a known reward but is not available in this build; "
                             f"available: {sorted(REGISTRY)}")
        raise ValueError(f"unknown reward {name!r}; known: {sorted(KNOWN_REWARDS)}")
    return REGISTRY[name](**kwargs)


class WeightedReward:
    """sum_k w_k * reward_k. Every component is reported separately (weight 0 = monitored only)."""

    name = "weighted"

    def __init__(self, weights: dict[str, float], rewards: dict[str, Reward] | None = None,
                 options: dict[str, dict[str, Any]] | None = None):
        self.weights = dict(weights)
        opts = options or {}
        self.rewards = rewards if rewards is not None else {n: build_reward(n, **opts.get(n, {})) for n in weights}

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> dict[str, np.ndarray]:
        """-> {"avg": [N] weighted sum, "<name>": [N] raw scores per component}. Videos (5-D, [N, F, H, W, 3]): every
        frame is scored as an image and each score is averaged per clip (:mod:`flowgrpo.rewards.video`)."""
        from flowgrpo.rewards.video import frames_as_images, is_video, mean_per_clip

        if is_video(images):
            frames, frame_prompts, frame_metadata, num_frames = frames_as_images(images, prompts, metadata)
            per_frame = self(frames, frame_prompts, frame_metadata)
            return {name: mean_per_clip(scores, num_frames) for name, scores in per_frame.items()}
        images = as_uint8(images)
        out: dict[str, np.ndarray] = {}
        total = np.zeros(len(images), dtype=np.float64)
        for name, w in self.weights.items():
            scores = np.asarray(self.rewards[name](images, prompts, metadata).scores, dtype=np.float64)
            if scores.shape != (len(images),):
                raise ValueError(f"reward {name!r} returned shape {scores.shape}, expected ({len(images)},)")
            out[name] = scores
            total += w * scores
        out["avg"] = total
        return out
