"""The ``shapes`` reward: the shapes world's rule-based detector (:func:`flowgrpo.eval.shapes.detect`) judged by
the GenEval rules (:mod:`flowgrpo.rewards.geneval.rules`). No model weights, numpy + scipy only.

``build_reward("shapes")`` scores a batch like the ``geneval`` reward: per image i, against ``metadata[i]`` (a
GenEval row; :func:`flowgrpo.eval.shapes.prompt_set` makes them),

* ``scores[i]`` - the GenEval partial-credit training reward (``GenEvalResult.score``: 1.0 exactly when the image
  satisfies the row with exact counts, colours and relations; partial credit otherwise; may be negative), plus
  ``shaping x`` the dense :func:`~flowgrpo.eval.shapes.shape_proximity` when that option is set,
* ``details[i]`` - ``{"correct", "strict_correct", "score", "tag", "reason", "standard_reason", "detections"}``
  (the geneval reward's keys, so :func:`flowgrpo.rewards.geneval.reward.geneval_metrics` applies unchanged).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from flowgrpo.eval.shapes import MAX_COLOR_DIST, judge, shape_proximity
from flowgrpo.rewards.base import RewardOutput, as_uint8, register


@register("shapes")
class ShapesReward:
    """GenEval partial credit of shapes-world images. ``only_strict``: skip the standard verdict (``correct``
    is then always False, as in the geneval reward); ``min_area`` / ``max_color_dist``: detector options
    (:func:`flowgrpo.eval.shapes.detect`); ``shaping``: add ``shaping x`` :func:`~flowgrpo.eval.shapes.shape_proximity`
    (a dense training signal: within a group where every image fails the same way, the one closest to the
    requested shapes still gets the highest reward; the verdicts in ``details`` are unchanged)."""

    name = "shapes"

    def __init__(self, only_strict: bool = False, min_area: float | None = None,
                 max_color_dist: float = MAX_COLOR_DIST, shaping: float = 0.0):
        if not 0.0 <= float(shaping) <= 10.0:
            raise ValueError(f"reward_options.shapes.shaping must be in [0, 10], got {shaping!r}")
        self.only_strict = bool(only_strict)
        self.shaping = float(shaping)
        self.detect_options: dict[str, Any] = {"min_area": min_area, "max_dist": float(max_color_dist)}

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
        images = as_uint8(images)
        if len(metadata) != len(images):
            raise ValueError(f"shapes needs one metadata row per image: {len(images)} images, "
                             f"{len(metadata)} metadata rows")
        for i, meta in enumerate(metadata):
            if not isinstance(meta, dict) or "include" not in meta:
                raise ValueError(f"metadata[{i}] is not a GenEval row (needs 'include' clauses): {meta!r}")
        details = [judge(image, meta, only_strict=self.only_strict, **self.detect_options)
                   for image, meta in zip(images, metadata)]
        scores = np.asarray([d["score"] for d in details], dtype=np.float64)
        if self.shaping:
            prox = np.asarray([shape_proximity(image, meta, **self.detect_options)
                               for image, meta in zip(images, metadata)])
            for d, p in zip(details, prox):
                d["shape_proximity"] = float(p)
            scores = scores + self.shaping * prox
        return RewardOutput(scores, details)


__all__ = ["ShapesReward"]
