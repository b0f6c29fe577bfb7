"""``ocr``: does the image show the prompt's quoted text? (text-rendering reward)

Target: the first quoted substring of the prompt, in straight (``"..."``) or curly (``“...”``) double quotes, or
else in curly single quotes (``‘...’``; straight single quotes are not used: they are apostrophes far more often).
Recognised: every text box RapidOCR finds with confidence > 0, in reading order (see :func:`reading_order`:
lines top to bottom, boxes left to right within a line), concatenated. Both strings are normalised (lowercase,
all whitespace removed). Distance = 0 if the target is a substring of the recognised text, else
Levenshtein(recognised, target), capped at len(target). Score = 1 − distance / len(target), in [0, 1].
A prompt without quoted text scores 0 (``details["reason"] = "no quoted text in prompt"``).

Engine: ``rapidocr-onnxruntime`` (PP-OCRv4 det/rec ONNX models shipped inside its wheel, so it works offline).
Upstream uses PaddleOCR 2.9 (``lang=en``, no angle classifier); RapidOCR runs the same PP-OCR model family through
onnxruntime. The engine is created **at construction**. Calls are serialised by a lock (RapidOCR keeps per-call
state on the engine object), so an instance may be shared by a thread pool.

Options: ``device`` ("cpu" default; "cuda"/"auto" ask onnxruntime's CUDA provider, which needs the
``onnxruntime-gpu`` build), ``num_threads`` (onnxruntime intra-op threads; -1 = onnxruntime's default),
``det_limit_side_len`` / ``det_limit_type`` (detector input scaling; default 960/"max" as PaddleOCR: images whose
longer side exceeds 960 px are downscaled, smaller ones are kept), ``use_angle_cls`` (default False, as upstream),
``min_confidence`` (keep boxes with confidence strictly above it; default 0.0), ``batch_size`` (accepted for a
uniform interface; images are recognised one by one).
"""

from __future__ import annotations

import re
import threading
from typing import Any, Sequence

import numpy as np

from flowgrpo.rewards.base import RewardOutput, as_uint8, register

_DOUBLE = re.compile(r"[\"“”„]([^\"“”„]*)[\"“”]")
_SINGLE_CURLY = re.compile(r"‘([^‘’]*)’")


def extract_target(prompt: str) -> str | None:
    """The first non-empty quoted substring of ``prompt`` (double quotes, straight or curly; else curly single
    quotes), unnormalised; None if there is none."""
    for pattern in (_DOUBLE, _SINGLE_CURLY):
        for m in pattern.finditer(prompt):
            if m.group(1).strip():
                return m.group(1)
    return None


def normalize_text(text: str) -> str:
    """Lowercase, every whitespace character removed."""
    return re.sub(r"\s+", "", text).lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions; unit costs)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_distance(recognized: str, target: str) -> int:
    """0 if ``target`` occurs in ``recognized`` (both already normalised), else their Levenshtein distance capped
    at ``len(target)``."""
    if target in recognized:
        return 0
    return min(levenshtein(recognized, target), len(target))


def ocr_score(recognized: str, target: str) -> float:
    """1 − ocr_distance / len(target) on normalised strings (0 for an empty target)."""
    r, t = normalize_text(recognized), normalize_text(target)
    if not t:
        return 0.0
    return 1.0 - ocr_distance(r, t) / len(t)


def _bounds(box: Any) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a box given as 4 corner points [[x, y], ...] or as [x0, y0, x1, y1]."""
    a = np.asarray(box, dtype=np.float64)
    if a.ndim == 1 and a.size == 4:
        return float(a[0]), float(a[1]), float(a[2]), float(a[3])
    a = a.reshape(-1, 2)
    return float(a[:, 0].min()), float(a[:, 1].min()), float(a[:, 0].max()), float(a[:, 1].max())


def reading_order(boxes: Sequence[Any], line_overlap: float = 0.5) -> list[int]:
    """Indices of ``boxes`` in reading order: boxes are grouped into lines (a box joins a line when its vertical
    extent overlaps the line's by at least ``line_overlap`` of the smaller height), lines go top to bottom (by
    their mean vertical centre) and boxes left to right within a line (by their left edge).

    A word slightly higher than its left neighbour therefore still comes after it, which a plain
    (top, left) sort — and RapidOCR's own ordering, which only merges boxes whose tops are within 10 px —
    would get wrong."""
    b = [_bounds(x) for x in boxes]
    order = sorted(range(len(b)), key=lambda i: ((b[i][1] + b[i][3]) / 2, b[i][0]))
    lines: list[dict[str, Any]] = []
    for i in order:
        x0, y0, x1, y1 = b[i]
        h = max(y1 - y0, 1e-6)
        best, best_ov = None, 0.0
        for line in lines:
            ov = min(y1, line["y1"]) - max(y0, line["y0"])
            frac = ov / max(min(h, line["y1"] - line["y0"]), 1e-6)
            if frac >= line_overlap and frac > best_ov:
                best, best_ov = line, frac
        if best is None:
            lines.append({"y0": y0, "y1": y1, "items": [i]})
        else:
            best["items"].append(i)
            best["y0"], best["y1"] = min(best["y0"], y0), max(best["y1"], y1)
    for line in lines:
        line["cy"] = float(np.mean([(b[i][1] + b[i][3]) / 2 for i in line["items"]]))
    out: list[int] = []
    for line in sorted(lines, key=lambda ln: ln["cy"]):
        out.extend(sorted(line["items"], key=lambda i: (b[i][0], b[i][1])))
    return out


def join_ocr_results(results: Sequence[Any] | None, min_confidence: float = 0.0) -> str:
    """Concatenate the text of RapidOCR results ``[[box, text, confidence], ...]`` (None = nothing found) with
    confidence > ``min_confidence``, in :func:`reading_order`."""
    if not results:
        return ""
    kept = [r for r in results if float(r[2]) > min_confidence and str(r[1])]
    if not kept:
        return ""
    return "".join(str(kept[i][1]) for i in reading_order([r[0] for r in kept]))


@register("ocr")
class OcrReward:
    """Text-rendering reward with RapidOCR (see the module docstring)."""

    name = "ocr"

    def __init__(self, device: str = "cpu", num_threads: int = -1, det_limit_side_len: int = 960,
                 det_limit_type: str = "max", use_angle_cls: bool = False, min_confidence: float = 0.0,
                 batch_size: int = 1):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise ImportError("the 'ocr' reward needs rapidocr-onnxruntime (pip install rapidocr-onnxruntime)") from e
        use_cuda = str(device).startswith("cuda")
        if str(device) == "auto":
            try:
                import onnxruntime

                use_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
            except Exception:  # pragma: no cover - onnxruntime is a dependency of rapidocr
                use_cuda = False
        self.device = "cuda" if use_cuda else "cpu"
        self.min_confidence = float(min_confidence)
        self.use_angle_cls = bool(use_angle_cls)
        self.batch_size = int(batch_size)
        self.engine = RapidOCR(
            text_score=0.0,  # RapidOCR drops results below text_score itself; we filter with min_confidence
            use_cls=self.use_angle_cls,
            det_limit_side_len=det_limit_side_len,
            det_limit_type=det_limit_type,
            det_use_cuda=use_cuda,
            rec_use_cuda=use_cuda,
            cls_use_cuda=use_cuda,
            intra_op_num_threads=int(num_threads),
        )
        self._lock = threading.Lock()

    def recognize(self, image: np.ndarray) -> str:
        """All text in one uint8 RGB [H, W, 3] image, in reading order (unnormalised)."""
        bgr = np.ascontiguousarray(image[..., ::-1])  # RapidOCR treats ndarray input as OpenCV BGR
        with self._lock:
            result, _ = self.engine(bgr, use_cls=self.use_angle_cls)
        return join_ocr_results(result, self.min_confidence)

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> RewardOutput:
        images = as_uint8(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        scores, details = [], []
        for image, prompt in zip(images, prompts, strict=True):
            target = extract_target(prompt)
            if target is None or not normalize_text(target):
                scores.append(0.0)
                details.append({"reason": "no quoted text in prompt", "target": None})
                continue
            text = self.recognize(image)
            t, r = normalize_text(target), normalize_text(text)
            dist = ocr_distance(r, t)
            scores.append(1.0 - dist / len(t))
            details.append({"target": t, "recognized": r, "distance": dist})
        return RewardOutput(np.asarray(scores, dtype=np.float64), details)


__all__ = ["OcrReward", "extract_target", "join_ocr_results", "levenshtein", "normalize_text", "ocr_distance",
           "ocr_score", "reading_order"]
