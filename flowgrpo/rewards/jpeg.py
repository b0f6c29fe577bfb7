"""JPEG (in)compressibility: the DDPO toy rewards. Score = -/+ (JPEG q95 size in kB) / 500."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from flowgrpo.rewards.base import RewardOutput, register


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    """uint8 [H, W, 3] -> size of its JPEG encoding in kB."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class _Jpeg:
    sign = -1.0

    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        sizes = np.array([jpeg_size_kb(im, self.quality) for im in images], dtype=np.float64)
        return RewardOutput(self.sign * sizes / 500.0, [{"jpeg_kb": float(s)} for s in sizes])


@register("jpeg_compressibility")
class JpegCompressibility(_Jpeg):
    name = "jpeg_compressibility"
    sign = -1.0


@register("jpeg_incompressibility")
class JpegIncompressibility(_Jpeg):
    name = "jpeg_incompressibility"
    sign = 1.0
