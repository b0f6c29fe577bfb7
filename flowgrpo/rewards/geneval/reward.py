"""The ``geneval`` reward: detector + colour classifier + the GenEval rules (:mod:`.rules`).

``build_reward("geneval", model=..., color_model=..., device=...)`` (or inject ``detector=`` / ``color=``
objects). Per image i it judges the detections against ``metadata[i]`` (a GenEval metadata row with ``tag``,
``include`` and optional ``exclude``) and returns

* ``scores[i]`` - the partial-credit training reward (``GenEvalResult.score``; <= 1, may be negative),
* ``details[i]`` - ``{"correct", "strict_correct", "score", "tag", "reason", "standard_reason", "detections"}``
  with ``detections`` the kept detections as dicts (class, score, box, colour where one was computed).

:func:`geneval_metrics` turns the details of a batch into the reward server's extra columns (``accuracy``,
``strict_accuracy``, ``<tag>_accuracy``, ``<tag>_strict_accuracy`` with -10 for images of other tags).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from flowgrpo.rewards.base import RewardOutput, as_uint8, register
from flowgrpo.rewards.geneval.detector import (DEFAULT_COLOR_MODEL, DEFAULT_DETECTOR, ClipColorClassifier, Detector,
                                               Mask2FormerDetector)
from flowgrpo.rewards.geneval.rules import TAGS, ColorClassifier, evaluate, per_tag_columns


@register("geneval")
class GenEvalReward:
    """GenEval partial-credit reward.

    ``detector``: a :class:`~.detector.Detector` object (default: :class:`Mask2FormerDetector` on ``model``);
    ``color``: a :class:`~.rules.ColorClassifier` (default: :class:`ClipColorClassifier` on ``color_model``; built
    lazily at the first colour question when ``lazy_color=True``); ``device``/``dtype``: for the default models;
    ``only_strict``: skip the standard verdict (``correct`` is then always False, as in the reward server);
    ``detector_options`` / ``color_options``: extra keyword arguments of the default models (e.g. ``size``,
    ``batch_size``, ``revision``)."""

    name = "geneval"

    def __init__(self, detector: Detector | None = None, color: ColorClassifier | None = None,
                 model: str = DEFAULT_DETECTOR, color_model: str = DEFAULT_COLOR_MODEL, device: Any = "auto",
                 dtype: Any = "float32", only_strict: bool = False, lazy_color: bool = False,
                 detector_options: dict[str, Any] | None = None, color_options: dict[str, Any] | None = None,
                 cache_dir: Any = None):
        self.only_strict = bool(only_strict)
        self._color_args = dict(model=color_model, device=device, dtype=dtype, cache_dir=cache_dir,
                                **(color_options or {}))
        self.detector = detector if detector is not None else Mask2FormerDetector(
            model, device=device, dtype=dtype, cache_dir=cache_dir, **(detector_options or {}))
        self._color = color
        if self._color is None and not lazy_color:
            self._color = ClipColorClassifier(**self._color_args)

    @property
    def color(self) -> ColorClassifier:
        if self._color is None:
            self._color = ClipColorClassifier(**self._color_args)
        return self._color

    def _classify(self, crops: Sequence[np.ndarray], classname: str) -> list[str]:
        return list(self.color(crops, classname))

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        images = as_uint8(images)
        if len(metadata) != len(images):
            raise ValueError(f"geneval needs one metadata row per image: {len(images)} images, "
                             f"{len(metadata)} metadata rows")
        for i, meta in enumerate(metadata):
            if not isinstance(meta, dict) or "include" not in meta:
                raise ValueError(f"metadata[{i}] is not a GenEval row (needs 'include' clauses): {meta!r}")
        detections = self.detector.detect(images)
        if len(detections) != len(images):
            raise ValueError(f"detector returned {len(detections)} results for {len(images)} images")
        scores = np.zeros(len(images), dtype=np.float64)
        details: list[dict[str, Any]] = []
        for i, (image, meta, dets) in enumerate(zip(images, metadata, detections)):
            res = evaluate(meta, dets, image=image, color_classifier=self._classify, only_strict=self.only_strict)
            scores[i] = res.score
            details.append({
                "correct": res.correct, "strict_correct": res.strict_correct, "score": res.score, "tag": res.tag,
                "reason": res.reason, "standard_reason": res.standard_reason,
                "detections": [d.to_dict() for dets_c in res.detections.values() for d in dets_c],
            })
        return RewardOutput(scores, details)


def geneval_metrics(details: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The reward server's extra columns for a batch of :class:`GenEvalReward` details: ``accuracy`` and
    ``strict_accuracy`` (0/1 per image) and, per tag of :data:`~.rules.TAGS`, ``<tag>_accuracy`` and
    ``<tag>_strict_accuracy`` (0/1 for images of that tag, -10 elsewhere)."""
    tags = [d["tag"] for d in details]
    correct = [float(bool(d["correct"])) for d in details]
    strict = [float(bool(d["strict_correct"])) for d in details]
    out = {"accuracy": np.asarray(correct, dtype=np.float64), "strict_accuracy": np.asarray(strict, dtype=np.float64)}
    for tag, col in per_tag_columns(tags, correct).items():
        out[f"{tag}_accuracy"] = col
    for tag, col in per_tag_columns(tags, strict).items():
        out[f"{tag}_strict_accuracy"] = col
    return out


__all__ = ["GenEvalReward", "TAGS", "geneval_metrics"]
