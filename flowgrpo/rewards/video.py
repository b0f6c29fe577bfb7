"""Image rewards on video: every frame is scored as an image, and a clip's score is the mean over its frames.

:class:`~flowgrpo.rewards.WeightedReward` routes a 5-D batch (``[N, F, H, W, 3]`` uint8, or float ``[N, F, 3, H, W]``)
through :func:`frames_as_images` and :func:`mean_per_clip`, so every registered reward, local or remote (a reward
server receives the frames as images), scores video without knowing it. Each frame keeps its clip's prompt and
metadata. The weighted sum is linear, so averaging each component per clip and then weighting equals weighting per
frame and then averaging.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def is_video(images: Any) -> bool:
    """Whether a batch is a batch of clips (5-D: [N, F, H, W, 3] or [N, F, 3, H, W])."""
    return len(getattr(images, "shape", ())) == 5 or (isinstance(images, (list, tuple)) and len(images) > 0
                                                      and np.ndim(images[0]) == 4)


def frames_as_images(videos: Any, prompts: Sequence[str], metadata: Sequence[dict]
                     ) -> tuple[np.ndarray, list[str], list[dict], int]:
    """Clips [N, F, ...] -> (frames [N*F, ...] clip-major, prompts [N*F], metadata [N*F], F). Works on numpy arrays,
    torch tensors and lists of clips; the per-frame layout ([H, W, 3] or [3, H, W]) is kept."""
    if isinstance(videos, (list, tuple)):
        videos = np.stack([np.asarray(v) for v in videos])
    if hasattr(videos, "detach"):  # torch tensor
        videos = videos.detach().cpu().numpy()
    arr = np.asarray(videos)
    if arr.ndim != 5:
        raise ValueError(f"videos must be a batch of clips [N, F, H, W, 3] or [N, F, 3, H, W], got shape {arr.shape}")
    n, f = arr.shape[:2]
    if len(prompts) != n or len(metadata) != n:
        raise ValueError(f"{n} clips but {len(prompts)} prompts and {len(metadata)} metadata rows")
    frames = arr.reshape(n * f, *arr.shape[2:])  # clip-major: frame j of clip i is row i*F + j
    return frames, [p for p in prompts for _ in range(f)], [m for m in metadata for _ in range(f)], f


def mean_per_clip(scores: np.ndarray, num_frames: int) -> np.ndarray:
    """Per-frame scores [N*F] (clip-major) -> per-clip means [N] (float64)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size % num_frames:
        raise ValueError(f"expected [N*{num_frames}] per-frame scores, got shape {s.shape}")
    return s.reshape(-1, num_frames).mean(axis=1)


__all__ = ["frames_as_images", "is_video", "mean_per_clip"]
