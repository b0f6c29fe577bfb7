"""GenEval scoring rules: pure Python/numpy, no detector and no torch.

A GenEval prompt comes with metadata (one line of ``geneval/*_metadata.jsonl``)::

    {"tag": "position", "prompt": "a photo of a cow right of a laptop",
     "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}],
     "exclude": [{"class": ..., "count": ...}]}          # optional (counting prompts: "two X" excludes 3 X)

An image is judged from its object detections (:class:`Detection`: COCO class name, confidence, box
``(x0, y0, x1, y1)`` in pixels with y growing downward, optional boolean mask, optional colour):

1. :func:`filter_detections` keeps, per class, the detections with confidence > 0.3 (> 0.9 for the ``counting``
   tag), most confident first, at most 16 per class.
2. :func:`evaluate` applies the include/exclude clauses and returns a :class:`GenEvalResult` with

   * ``correct`` - the standard GenEval verdict: per include clause the ``count`` most confident detections of the
     class must exist ("at least count"); if the clause names a colour, at least ``count`` of those must be
     classified as that colour; if it names a position ``[relation, j]``, every one of them must stand in that
     relation (:func:`relative_position`) to every object matched for include clause ``j`` (fails when clause
     ``j`` failed); an exclude clause fails when the class has >= ``count`` kept detections.
   * ``strict_correct`` - the same with exact counts: a clause needs exactly ``count`` kept detections, exactly
     ``count`` of them of the colour, the same position test; excludes are ignored.
   * ``score`` - the partial-credit training reward of Flow-GRPO: the mean of a list ``L`` built per include
     clause as: ``1 - |count - n_found| / count`` with ``n_found`` = all kept detections of the class (so it is
     negative once ``n_found > 2 * count``); then, if ``n_found != count`` and the clause has a colour or a
     position, a 0; otherwise the colour appends ``1 - |count - n_colour| / count`` and the position (only if the
     clause is still matched) a 0 when the referenced clause failed, else a 0 at the first violating pair **and
     then always a trailing 1** (so a position clause with a wrong relation contributes [1, 0, 1]). These are the
     upstream reward-server's rules, quirks included.

3. :func:`aggregate` turns (tag, correct) pairs into the GenEval benchmark numbers: per-tag accuracy and
   ``overall`` = the unweighted mean of the per-tag accuracies. :func:`per_tag_columns` gives the reward
   server's per-tag columns (the value for images of that tag, -10 elsewhere).

Colours: a detection's ``color`` is used when set (tests give colours directly); otherwise a
:class:`ColorClassifier` (e.g. the CLIP zero-shot one in :mod:`.detector`) labels the crops made by
:func:`crop_object` (object mask composited on #999999 grey, cropped to the box). Colours are only computed for
the detections a colour clause actually inspects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

#: the ten colours GenEval classifies into (CLIP zero-shot), in the upstream order (ties go to the first)
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
#: the six GenEval task tags, in the benchmark's order
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
#: the four relations of a ``position`` clause
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

THRESHOLD = 0.3  # keep detections with confidence > THRESHOLD ...
COUNTING_THRESHOLD = 0.9  # ... or > COUNTING_THRESHOLD when the prompt's tag is "counting"
MAX_OBJECTS = 16  # per class, after sorting by confidence
POSITION_MARGIN = 0.1  # the margin rule: shrink the centre offset by 0.1 * (dim_a + dim_b) per axis
NO_RELATION_EPS = 1e-3  # |shrunk offset| below this on both axes -> no relation
PLACEHOLDER = -10.0  # per-tag column value for images of another tag
#: grey background of the colour crops (#999999)
CROP_BACKGROUND = (153, 153, 153)

Box = tuple[float, float, float, float]


@dataclass
class Detection:
    """One detected object. ``box`` = (x0, y0, x1, y1) in pixels (y grows downward); ``mask``: bool [H, W] of
    the whole image or None; ``color``: one of :data:`COLORS` when known (else a :class:`ColorClassifier` is
    asked)."""

    cls: str
    score: float
    box: Box
    mask: np.ndarray | None = None
    color: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no mask)."""
        out: dict[str, Any] = {"class": self.cls, "score": float(self.score),
                               "box": [float(v) for v in list(self.box)[:4]]}
        if self.color is not None:
            out["color"] = self.color
        return out


class ColorClassifier(Protocol):
    """Colour of object crops: ``classifier(crops, classname) -> [colour name per crop]`` (names from
    :data:`COLORS`). ``crops``: uint8 [h, w, 3] arrays made by :func:`crop_object`; ``classname``: the COCO class
    of every crop in the call (the CLIP prompts mention it)."""

    def __call__(self, crops: Sequence[np.ndarray], classname: str) -> list[str]: ...


@dataclass
class GenEvalResult:
    correct: bool  # standard GenEval verdict (always False when evaluated with only_strict=True, as upstream)
    strict_correct: bool  # exact counts / colour counts, same position test, excludes ignored
    score: float  # partial-credit training reward (<= 1, may be negative)
    reason: str  # why strict/score failed ("" when strictly correct)
    standard_reason: str = ""  # why the standard verdict failed ("" when correct)
    tag: str = ""
    #: the detections kept by :func:`filter_detections`, per class (most confident first); colours filled in
    #: where a colour clause looked at them
    detections: dict[str, list[Detection]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- filtering


def confidence_threshold(tag: str | None) -> float:
    return COUNTING_THRESHOLD if tag == "counting" else THRESHOLD


def filter_detections(detections: Iterable[Detection], tag: str | None,
                      max_per_class: int = MAX_OBJECTS) -> dict[str, list[Detection]]:
    """Per class: confidence > 0.3 (> 0.9 when ``tag == "counting"``), most confident first (stable for ties),
    at most ``max_per_class``. Classes left without detections are absent. Idempotent."""
    thr = confidence_threshold(tag)
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if float(det.score) > thr:
            by_class.setdefault(det.cls, []).append(det)
    return {cls: sorted(dets, key=lambda d: -float(d.score))[:max_per_class] for cls, dets in by_class.items()}


# ---------------------------------------------------------------------------------------------- geometry


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      margin: float = POSITION_MARGIN) -> set[str]:
    """Relations of A with respect to B, a subset of {"left of", "right of", "above", "below"} (possibly two, e.g.
    above and left of; empty when the objects are too close to call).

    offset = centre(A) - centre(B); each axis is shrunk toward 0 by ``margin * (dim_A + dim_B)`` on that axis
    (clamped at 0, sign kept); if both shrunk components are ~0 there is no relation; else (dx, dy) = shrunk /
    |offset| (the *unshrunk* length) and dx < -0.5 -> left of, dx > 0.5 -> right of, dy < -0.5 -> above,
    dy > 0.5 -> below (image y grows downward)."""
    a = np.asarray(box_a, dtype=np.float64)[:4]
    b = np.asarray(box_b, dtype=np.float64)[:4]
    centre_a = (a[:2] + a[2:]) / 2.0
    centre_b = (b[:2] + b[2:]) / 2.0
    dim_a = np.abs(a[2:] - a[:2])
    dim_b = np.abs(b[2:] - b[:2])
    offset = centre_a - centre_b
    shrunk = np.maximum(np.abs(offset) - margin * (dim_a + dim_b), 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < NO_RELATION_EPS):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def crop_object(image: np.ndarray, det: Detection, background: Sequence[int] = CROP_BACKGROUND) -> np.ndarray:
    """The colour-classification crop of ``det``: the image where the mask is set and ``background`` grey
    elsewhere (the whole image when there is no mask), cropped to the box (coordinates rounded, clipped to the
    image, at least 1 pixel). uint8 [h, w, 3]."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {img.shape}")
    img = img.astype(np.uint8, copy=False)
    if det.mask is not None:
        mask = np.asarray(det.mask).astype(bool)
        if mask.shape != img.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image {img.shape[:2]}")
        img = np.where(mask[..., None], img, np.asarray(background, dtype=np.uint8)[None, None, :])
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (int(round(float(v))) for v in list(det.box)[:4])
    x0, x1 = min(max(x0, 0), w - 1), min(max(x1, 0), w)
    y0, y1 = min(max(y0, 0), h - 1), min(max(y1, 0), h)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    return np.ascontiguousarray(img[y0:y1, x0:x1])


class _Colours:
    """Colours of detections: the given ``color`` if set, else the classifier on the crops (computed once per
    detection, only for detections a colour clause inspects)."""

    def __init__(self, image: np.ndarray | None, classifier: ColorClassifier | None):
        self.image = image
        self.classifier = classifier
        self.cache: dict[int, str] = {}

    def __call__(self, dets: Sequence[Detection], classname: str) -> list[str]:
        todo = [d for d in dets if d.color is None and id(d) not in self.cache]
        if todo:
            if self.classifier is None or self.image is None:
                raise ValueError(f"colour of {classname!r} detections needed but they carry no colour and no "
                                 "colour classifier + image was given")
            names = list(self.classifier([crop_object(self.image, d) for d in todo], classname))
            if len(names) != len(todo):
                raise ValueError(f"colour classifier returned {len(names)} colours for {len(todo)} crops")
            for d, name in zip(todo, names):
                self.cache[id(d)] = name
        return [d.color if d.color is not None else self.cache[id(d)] for d in dets]


# -------------------------------------------------------------------------------------------- evaluation


def _position_target(groups: list[list[Detection] | None], req: Mapping[str, Any]) -> tuple[str, int]:
    relation, index = req["position"]
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r} in {dict(req)}; expected one of {RELATIONS}")
    if not 0 <= int(index) < len(groups):
        raise ValueError(f"position clause {dict(req)} refers to include clause {index}, which is not an earlier "
                         "clause")
    return relation, int(index)


def _first_violation(objs: Sequence[Detection], targets: Sequence[Detection],
                     relation: str) -> tuple[Detection, Detection, set[str]] | None:
    for obj in objs:
        for target in targets:
            rels = relative_position(obj.box, target.box)
            if relation not in rels:
                return obj, target, rels
    return None


def _describe(rels: set[str]) -> str:
    return " and ".join(sorted(rels)) if rels else "no relation"


def _standard(metadata: Mapping[str, Any], kept: Mapping[str, list[Detection]],
              colours: _Colours) -> tuple[bool, list[str]]:
    """Standard GenEval correctness ("at least count", top-count detections, excludes apply)."""
    correct = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        objs = kept.get(cls, [])[:count]
        matched = True
        if len(objs) < count:
            matched = False
            reasons.append(f"expected {cls}>={count}, found {len(objs)}")
        else:
            if "color" in req:
                cols = colours(objs, cls)
                n_ok = cols.count(req["color"])
                if n_ok < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {n_ok} {req['color']} "
                                   f"(colours: {', '.join(cols)})")
            if "position" in req and matched:
                relation, index = _position_target(groups, req)
                target = groups[index]
                if target is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    bad = _first_violation(objs, target, relation)
                    if bad is not None:
                        matched = False
                        reasons.append(f"expected {cls} {relation} {bad[1].cls}, found {_describe(bad[2])}")
        correct = correct and matched
        groups.append(objs if matched else None)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], int(req["count"])
        n = len(kept.get(cls, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {n}")
    return correct, reasons


def _strict_and_score(metadata: Mapping[str, Any], kept: Mapping[str, list[Detection]],
                      colours: _Colours) -> tuple[bool, float, list[str]]:
    """Strict correctness (exact counts, excludes ignored) and the partial-credit list L (module docstring)."""
    correct = True
    reasons: list[str] = []
    credits: list[float] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        if count <= 0:
            raise ValueError(f"include clause {dict(req)} needs count >= 1")
        objs = kept.get(cls, [])
        matched = True
        credits.append(1.0 - abs(count - len(objs)) / count)
        if len(objs) != count:
            matched = False
            reasons.append(f"expected {cls}=={count}, found {len(objs)}")
            if "color" in req or "position" in req:
                credits.append(0.0)
        else:
            if "color" in req:
                cols = colours(objs, cls)
                n_ok = cols.count(req["color"])
                credits.append(1.0 - abs(count - n_ok) / count)
                if n_ok != count:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}=={count}, found {n_ok} {req['color']} "
                                   f"(colours: {', '.join(cols)})")
            if "position" in req and matched:
                relation, index = _position_target(groups, req)
                target = groups[index]
                if target is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                    credits.append(0.0)
                else:
                    bad = _first_violation(objs, target, relation)
                    if bad is not None:
                        matched = False
                        reasons.append(f"expected {cls} {relation} {bad[1].cls}, found {_describe(bad[2])}")
                        credits.append(0.0)
                    credits.append(1.0)  # upstream quirk: appended whether or not a pair violated the relation
        correct = correct and matched
        groups.append(objs if matched else None)
    score = float(sum(credits) / len(credits)) if credits else 0.0
    return correct, score, reasons


def evaluate(metadata: Mapping[str, Any], detections: Iterable[Detection] | Mapping[str, Sequence[Detection]], *,
             image: np.ndarray | None = None, color_classifier: ColorClassifier | None = None,
             only_strict: bool = False) -> GenEvalResult:
    """Judge one image's detections against one metadata row (see the module docstring for the rules).

    ``detections``: the detector's raw detections (a list, or a dict class -> list); :func:`filter_detections`
    is applied with the row's tag (a no-op on already filtered detections). Colours come from
    ``Detection.color`` or, when that is None, from ``color_classifier`` on crops of ``image``.
    ``only_strict=True`` skips the standard verdict (``correct`` is then False, as in the reward server)."""
    tag = metadata.get("tag")
    if isinstance(detections, Mapping):
        detections = [d for dets in detections.values() for d in dets]
    kept = filter_detections(detections, tag)
    colours = _Colours(image, color_classifier)
    strict, score, reasons = _strict_and_score(metadata, kept, colours)
    if only_strict:
        correct, std_reasons = False, ["standard verdict not computed (only_strict)"]
    else:
        correct, std_reasons = _standard(metadata, kept, colours)
    # report the colours that were computed
    if colours.cache:
        kept = {cls: [d if d.color is not None or id(d) not in colours.cache
                      else Detection(d.cls, d.score, d.box, d.mask, colours.cache[id(d)]) for d in dets]
                for cls, dets in kept.items()}
    return GenEvalResult(correct=bool(correct), strict_correct=bool(strict), score=score,
                         reason="; ".join(reasons), standard_reason="; ".join(std_reasons),
                         tag=str(tag or ""), detections=kept)


# ------------------------------------------------------------------------------------------- aggregation


def aggregate(results: Iterable[tuple[str, Any]]) -> dict[str, float]:
    """GenEval benchmark summary of (tag, correct) pairs: ``{"<tag>": accuracy over that tag's images, ...,
    "overall": mean of the per-tag accuracies}`` (each tag weighs the same whatever its number of images; tags
    with no images are absent and do not enter the mean; no results -> overall NaN)."""
    per_tag: dict[str, list[float]] = {}
    for tag, ok in results:
        per_tag.setdefault(str(tag), []).append(float(ok))
    known = [t for t in TAGS if t in per_tag]
    order = known + sorted(t for t in per_tag if t not in TAGS)
    out = {tag: float(np.mean(per_tag[tag])) for tag in order}
    out["overall"] = float(np.mean([out[t] for t in order])) if order else math.nan
    return out


def per_tag_columns(tags: Sequence[str], values: Sequence[Any], tag_names: Sequence[str] = TAGS,
                    placeholder: float = PLACEHOLDER) -> dict[str, np.ndarray]:
    """The reward server's per-tag columns: for each tag of ``tag_names`` an array [N] holding ``float(value)``
    where the image has that tag and ``placeholder`` (-10) elsewhere (filter ``!= -10`` before averaging)."""
    if len(tags) != len(values):
        raise ValueError(f"{len(tags)} tags but {len(values)} values")
    vals = np.asarray([float(v) for v in values], dtype=np.float64)
    tag_arr = np.asarray(list(tags), dtype=object)
    return {t: np.where(tag_arr == t, vals, placeholder).astype(np.float64) for t in tag_names}


__all__ = [
    "COLORS", "COUNTING_THRESHOLD", "CROP_BACKGROUND", "ColorClassifier", "Detection", "GenEvalResult",
    "MAX_OBJECTS", "PLACEHOLDER", "POSITION_MARGIN", "RELATIONS", "TAGS", "THRESHOLD", "aggregate",
    "confidence_threshold", "crop_object", "evaluate", "filter_detections", "per_tag_columns", "relative_position",
]
