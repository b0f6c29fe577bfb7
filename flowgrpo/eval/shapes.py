"""The shapes world: a synthetic compositional benchmark in GenEval's image, small enough for tiny models.

Objects are flat, axis-aligned, upright shapes (:data:`SHAPES`: circle, square, triangle) in one of
:data:`COLORS` (a fixed RGB :data:`PALETTE`, well apart from each other and from the uniform grey
:data:`BACKGROUND`). Prompts follow GenEval's six tags, each with a GenEval metadata row (``tag``, ``prompt``,
``include`` clauses with ``class`` / ``count`` / ``color`` / ``position``, ``exclude`` for counting) that the
GenEval rule engine (:mod:`flowgrpo.rewards.geneval.rules`) judges unchanged:

============== ===================================================== ==============================================
tag            prompt                                                include clauses
============== ===================================================== ==============================================
single_object  a photo of a red circle                               circle x1 red
colors         a photo of a yellow square                            square x1 yellow
two_object     a photo of a red circle and a red square              circle x1 red, square x1 red (colours may be
                                                                     equal; the two shapes differ)
color_attr     a photo of a red circle and a blue triangle           circle x1 red, triangle x1 blue (colours
                                                                     differ, so the binding matters)
counting       a photo of three green triangles                      triangle x3 green; exclude triangle >= 4
position       a photo of a red circle left of a blue square         square x1 blue, circle x1 red at
                                                                     ["left of", 0] (GenEval: "X left of Y" means
                                                                     X is left of Y; Y is clause 0)
============== ===================================================== ==============================================

Every object of every prompt names its colour: with three shapes the colour-free GenEval prompts would be too few
(3 single-object prompts) for disjoint train/test splits, so ``single_object`` / ``colors`` and ``two_object`` /
``color_attr`` share their structure (``color_attr`` alone forces two different colours). Counting uses 2-4
objects (as GenEval); the two shapes of a pair or a relation always differ (the rules match objects by class).

* :func:`all_prompts` lists every metadata row of a tag; :func:`split_of` puts each *scene* in ``train`` or
  ``test`` (``holdout="hash"``: a fixed hash of the scene puts ~20% of the scenes of every tag in ``test``;
  ``holdout="combos"``: every scene with a colour-shape pair of :data:`HELD_OUT_COMBOS` is ``test``, the rest
  ``train``). A scene is order-free (``A and B`` = ``B and A``, ``A left of B`` = ``B right of A``) and the same
  scene is in the same split under every tag, so no test scene is ever shown in training.
* :func:`prompt_set` draws a deterministic, tag-balanced :class:`~flowgrpo.prompts.PromptSet` from one split.
* :func:`layout` places the objects of a metadata row (random sizes and places, no overlaps, a gap between
  objects, relations that hold by the GenEval margin rule with some slack) and :func:`draw` / :func:`render` /
  :func:`render_batch` rasterise them (optionally anti-aliased, optionally with Gaussian pixel noise):
  deterministic per seed, < 1 ms per 64 px image, numpy only.
* :func:`detect` is a rule-based detector (nearest palette colour per pixel, connected components, shape from the
  component's geometry) returning :class:`~flowgrpo.rewards.geneval.rules.Detection` objects with the colour set;
  :func:`score` / :func:`judge` judge an image against a metadata row with the GenEval rules (the ``shapes``
  reward, :mod:`flowgrpo.rewards.shapes`, does so per batch). Needs scipy (``ndimage.label``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from flowgrpo.prompts import PromptSet
from flowgrpo.rewards.geneval.rules import RELATIONS, TAGS, Detection, evaluate, relative_position

# ------------------------------------------------------------------------------------------------ vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: colour name -> RGB; every pair is >= 100 apart (Euclidean RGB) and >= 120 from the background
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 130, 0),
    "yellow": (245, 225, 40),
    "green": (30, 160, 60),
    "blue": (30, 80, 230),
    "purple": (135, 45, 185),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (160, 160, 160)
#: object counts of the ``counting`` tag (other tags have one object per clause)
COUNTING_COUNTS: tuple[int, ...] = (2, 3, 4)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "test")
HOLDOUTS = ("hash", "combos")
#: fraction of the scenes of each tag in the test split (``holdout="hash"``)
TEST_FRACTION = 0.2
#: the colour-shape pairs never shown in training with ``holdout="combos"`` (one per shape)
HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("orange", "circle"),
                                                         ("green", "square")})

# layout: object side in [MIN_FRAC, MAX_FRAC] x image size (at least MIN_SIDE pixels), gap between objects
MIN_FRAC, MAX_FRAC, MIN_SIDE = 0.15, 0.30, 7
GAP_FRAC, MIN_GAP = 0.05, 2
#: relations are laid out with this margin (the rules use 0.1): a slack for imperfect boxes
LAYOUT_MARGIN = 0.15

# detector
MAX_COLOR_DIST = 90.0  # a pixel whose nearest palette colour is farther than this is background
MIN_AREA_FRAC, MIN_AREA = 0.003, 6  # components smaller than max(MIN_AREA, MIN_AREA_FRAC * H * W) are specks
MIN_SOLIDITY = 0.6  # ... and so are those whose pixels fill less than this of their hole-filled area (rings)
MAX_ASPECT = 1.5  # a component whose box is more elongated than this is no shape
MAX_SHAPE_DIST = 0.25  # ... nor one whose features are this far from every prototype
PROXIMITY_SCALE = 0.5  # shape_proximity: a component this far from the requested prototype scores 0
#: shape prototypes in feature space (fill ratio of the box, half-vs-half area asymmetry)
PROTOTYPES: dict[str, tuple[float, float]] = {"square": (1.0, 0.0), "circle": (math.pi / 4, 0.0),
                                              "triangle": (0.5, 0.5)}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(word: str, count: int = 1) -> str:
    """"a red circle" / "three red circles" ("color shape" with its article or number)."""
    if count == 1:
        return f"{_article(word)} {word}"
    return f"{NUMBER_WORDS[count]} {word}s"


def _clause(shape: str, color: str, count: int = 1, position: tuple[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"class": shape, "count": int(count), "color": color}
    if position is not None:
        out["position"] = [position[0], int(position[1])]
    return out


def make_row(tag: str, objects: Sequence[tuple[str, str]], count: int = 1,
             relation: str | None = None) -> dict[str, Any]:
    """The metadata row of one prompt. ``objects``: (colour, shape) pairs in prompt order - one for
    ``single_object`` / ``colors`` / ``counting`` (``count`` copies), two for ``two_object`` / ``color_attr``,
    two for ``position`` ("first ``relation`` second")."""
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
    for color, shape in objects:
        if color not in PALETTE or shape not in SHAPES:
            raise ValueError(f"unknown object {color!r} {shape!r}; colours {COLORS}, shapes {SHAPES}")
    n_obj = 2 if tag in ("two_object", "color_attr", "position") else 1
    if len(objects) != n_obj:
        raise ValueError(f"tag {tag!r} needs {n_obj} object(s), got {len(objects)}")
    if n_obj == 2 and objects[0][1] == objects[1][1]:
        raise ValueError(f"the two objects of a {tag!r} prompt must be different shapes: {objects}")
    if tag == "color_attr" and objects[0][0] == objects[1][0]:
        raise ValueError(f"the two objects of a color_attr prompt must have different colours: {objects}")
    words = [f"{c} {s}" for c, s in objects]
    if tag in ("single_object", "colors"):
        return {"tag": tag, "include": [_clause(objects[0][1], objects[0][0])], "prompt": f"a photo of {_np(words[0])}"}
    if tag == "counting":
        if count not in COUNTING_COUNTS:
            raise ValueError(f"counting prompts have counts {COUNTING_COUNTS}, got {count}")
        color, shape = objects[0]
        return {"tag": tag, "include": [_clause(shape, color, count)],
                "exclude": [{"class": shape, "count": int(count) + 1}],
                "prompt": f"a photo of {_np(words[0], count)}"}
    if tag == "position":
        if relation not in RELATIONS:
            raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
        (ca, sa), (cb, sb) = objects
        return {"tag": tag, "include": [_clause(sb, cb), _clause(sa, ca, position=(relation, 0))],
                "prompt": f"a photo of {_np(words[0])} {relation} {_np(words[1])}"}
    return {"tag": tag, "include": [_clause(s, c) for c, s in objects],
            "prompt": f"a photo of {_np(words[0])} and {_np(words[1])}"}


def _copy_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in ("include", "exclude"):
        if key in row:
            out[key] = [{k: (list(v) if k == "position" else v) for k, v in c.items()} for c in row[key]]
    return out


@functools.lru_cache(maxsize=None)
def _rows(tag: str) -> tuple[dict[str, Any], ...]:
    objs = [(c, s) for s in SHAPES for c in COLORS]
    if tag in ("single_object", "colors"):
        return tuple(make_row(tag, [o]) for o in objs)
    if tag == "counting":
        return tuple(make_row(tag, [o], count=n) for n in COUNTING_COUNTS for o in objs)
    pairs = [(a, b) for a, b in itertools.product(objs, objs) if a[1] != b[1]]
    if tag == "two_object":
        return tuple(make_row(tag, p) for p in pairs)
    if tag == "color_attr":
        return tuple(make_row(tag, p) for p in pairs if p[0][0] != p[1][0])
    if tag == "position":
        return tuple(make_row(tag, p, relation=r) for r in RELATIONS for p in pairs)
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


def all_prompts(tag: str) -> list[dict[str, Any]]:
    """Every metadata row of ``tag`` (both splits; fresh copies), in a fixed order. Sizes: single_object /
    colors 24, counting 72, two_object 384, color_attr 336, position 1536."""
    return [_copy_row(r) for r in _rows(tag)]


# --------------------------------------------------------------------------------------------------- splits


def _objects_of(row: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    return [(str(c.get("color", "")), str(c["class"]), int(c["count"])) for c in row["include"]]


def scene_key(row: Mapping[str, Any]) -> str:
    """An order-free description of the scene a row asks for: the same for "A and B" / "B and A" and for
    "A left of B" / "B right of A", and for the same objects under different tags (no relation)."""
    inc = row["include"]
    rels = [(i, c["position"]) for i, c in enumerate(inc) if "position" in c]
    if not rels:
        return " + ".join(sorted(f"{n} {c} {s}" for c, s, n in _objects_of(row)))
    if len(inc) != 2 or len(rels) != 1 or rels[0][0] != 1 or int(rels[0][1][1]) != 0:
        raise ValueError(f"position rows must be [target, object at [relation, 0]]: {dict(row)}")
    (cb, sb, _), (ca, sa, _) = _objects_of(row)
    relation = rels[0][1][0]
    flip = {"right of": "left of", "below": "above"}
    if relation in flip:
        (ca, sa), (cb, sb), relation = (cb, sb), (ca, sa), flip[relation]
    return f"{ca} {sa} {relation} {cb} {sb}"


def split_of(row: Mapping[str, Any], holdout: str = "hash") -> str:
    """``"train"`` or ``"test"`` for a metadata row (see the module docstring)."""
    if holdout == "hash":
        digest = hashlib.sha256(("shapes-world/" + scene_key(row)).encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") / 2.0**64 < TEST_FRACTION else "train"
    if holdout == "combos":
        return "test" if any((c, s) in HELD_OUT_COMBOS for c, s, _ in _objects_of(row)) else "train"
    raise ValueError(f"unknown holdout {holdout!r}; expected 'hash' or 'combos'")


@functools.lru_cache(maxsize=None)
def _split_rows(tag: str, split: str, holdout: str) -> tuple[dict[str, Any], ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return tuple(row for row in _rows(tag) if split_of(row, holdout) == split)


def split_prompts(tag: str, split: str = "train", holdout: str = "hash") -> list[dict[str, Any]]:
    """The rows of ``tag`` in ``split`` (fresh copies), in :func:`all_prompts` order."""
    return [_copy_row(r) for r in _split_rows(tag, split, holdout)]


def prompt_set(n: int, seed: int = 0, split: str = "train", tags: Sequence[str] = TAGS,
               holdout: str = "hash") -> PromptSet:
    """``n`` prompts of ``split``, balanced over ``tags`` (counts differ by at most one; earlier tags get the
    extra ones), in a seeded random order. Within a tag the split's prompts are drawn without replacement (a
    fresh shuffle each time the pool is used up), so the set repeats prompts only when ``n`` exceeds the pool.
    Metadata rows are GenEval rows (``tag``, ``include``, ``exclude`` for counting, ``prompt``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    tags = list(tags)
    if not tags:
        raise ValueError("tags must not be empty")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if holdout not in HOLDOUTS:
        raise ValueError(f"unknown holdout {holdout!r}; expected one of {HOLDOUTS}")
    rng = np.random.default_rng([int(seed), SPLITS.index(split), HOLDOUTS.index(holdout)])
    rows: list[dict[str, Any]] = []
    for k, tag in enumerate(tags):
        pool = _split_rows(tag, split, holdout)
        want = n // len(tags) + (1 if k < n % len(tags) else 0)
        if want and not pool:
            raise ValueError(f"split {split!r} has no {tag!r} prompts (holdout={holdout!r})")
        while want > 0:
            order = rng.permutation(len(pool))[:want]
            rows.extend(_copy_row(pool[i]) for i in order)
            want -= len(order)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return PromptSet([r["prompt"] for r in rows], rows)


#: the built-in prompt sets ``builtin:shapes_train`` / ``builtin:shapes_test``: prompts per tag (tag-balanced)
BUILTIN_PROMPTS_PER_TAG = {"train": 256, "test": 16}


def builtin_prompt_set(split: str) -> PromptSet:
    """``builtin:shapes_<split>``: ``train`` = 256 prompts per tag of the train split (tags with fewer scenes,
    single objects, repeat theirs); ``test`` = 16 per tag of the test split (no test scene is in any train
    prompt). Seed 0, deterministic."""
    if split not in BUILTIN_PROMPTS_PER_TAG:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {sorted(BUILTIN_PROMPTS_PER_TAG)}")
    return prompt_set(len(TAGS) * BUILTIN_PROMPTS_PER_TAG[split], seed=0, split=split)


def write_jsonl(prompts: PromptSet | Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write metadata rows as ``<path>`` JSON lines (what :func:`flowgrpo.prompts.load_prompts` reads)."""
    rows = prompts.metadata if isinstance(prompts, PromptSet) else list(prompts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------------- render


@dataclass(frozen=True)
class ShapeObject:
    """One laid-out object: drawn inscribed in the ``side`` x ``side`` square at ``origin`` = (x, y) (pixels);
    ``box`` = (x0, y0, x1, y1), x1/y1 exclusive: the tight extent of its pixels when drawn without
    anti-aliasing (the box :func:`detect` returns); ``clause``: the include clause it was drawn for."""

    shape: str
    color: str
    origin: tuple[int, int]
    side: int
    box: tuple[int, int, int, int]
    clause: int = -1


def _rng(seed: Any) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def shape_coverage(shape: str, w: int, h: int, supersample: int = 1) -> np.ndarray:
    """float [h, w] in [0, 1]: the fraction of each pixel's ``supersample**2`` sample points inside the shape
    inscribed in the w x h box (circle: the inscribed ellipse; triangle: apex at the top centre, base along the
    bottom; square: the whole box)."""
    ss = max(1, int(supersample))
    ys = (np.arange(h * ss) + 0.5) / ss
    xs = (np.arange(w * ss) + 0.5) / ss
    if shape == "square":
        inside = np.ones((h * ss, w * ss), dtype=bool)
    elif shape == "circle":
        inside = ((xs[None, :] - w / 2) / (w / 2)) ** 2 + ((ys[:, None] - h / 2) / (h / 2)) ** 2 <= 1.0
    elif shape == "triangle":
        inside = np.abs(xs[None, :] - w / 2) <= ys[:, None] / h * (w / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if ss == 1:
        return inside.astype(np.float64)
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def _tight(shape: str, x0: int, y0: int, side: int) -> tuple[int, int, int, int]:
    cov = shape_coverage(shape, side, side) > 0
    rows, cols = np.flatnonzero(cov.any(1)), np.flatnonzero(cov.any(0))
    return (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)


def _side_range(size: int) -> tuple[int, int]:
    lo = max(MIN_SIDE, int(round(MIN_FRAC * size)))
    return lo, max(lo, int(round(MAX_FRAC * size)))


def _objects_to_draw(metadata: Mapping[str, Any], rng: np.random.Generator) -> list[tuple[str, str, int]]:
    objs: list[tuple[str, str, int]] = []
    for j, clause in enumerate(metadata.get("include", [])):
        shape, count = clause["class"], int(clause["count"])
        if shape not in SHAPES:
            raise ValueError(f"class {shape!r} is not a shape of the shapes world {SHAPES}")
        if count < 1:
            raise ValueError(f"include clause {dict(clause)} needs count >= 1")
        color = clause.get("color")
        if color is not None and color not in PALETTE:
            raise ValueError(f"colour {color!r} is not in the shapes palette {COLORS}")
        for _ in range(count):
            objs.append((shape, color if color is not None else COLORS[int(rng.integers(len(COLORS)))], j))
    for clause in metadata.get("exclude", []):
        n = sum(1 for s, _, _ in objs if s == clause["class"])
        if n >= int(clause["count"]):
            raise ValueError(f"metadata asks for {n} {clause['class']}s but excludes >= {clause['count']}")
    if not objs:
        raise ValueError(f"metadata has no include clauses: {dict(metadata)}")
    return objs


def layout(metadata: Mapping[str, Any], size: int = 64, seed: Any = 0, max_tries: int = 2000) -> list[ShapeObject]:
    """Place the objects a metadata row asks for in a ``size`` x ``size`` image: ``count`` objects per include
    clause (its colour, or a random palette colour when the clause names none), sides uniform in
    [0.15, 0.30] x size (>= 7 px), at least 0.05 x size (>= 2 px) apart and 1 px from the border, and every
    ``position`` clause's objects in exactly that relation (:func:`~flowgrpo.rewards.geneval.rules.
    relative_position` with a 0.15 margin, stricter than the rules' 0.1) to the objects of the clause they refer
    to. Deterministic per ``seed`` (an int, a sequence of ints or a numpy Generator)."""
    size = int(size)
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = _rng(seed)
    objs = _objects_to_draw(metadata, rng)
    relations = [(j, c["position"][0], int(c["position"][1])) for j, c in enumerate(metadata["include"])
                 if "position" in c]
    lo, hi = _side_range(size)
    gap = max(MIN_GAP, int(round(GAP_FRAC * size)))
    for attempt in range(max_tries):
        top = max(lo, hi - attempt // 50)  # shrink the largest side while placements keep failing
        placed: list[ShapeObject] = []
        ok = True
        for shape, color, j in objs:
            side = int(rng.integers(lo, top + 1))
            for _ in range(30):
                x0 = int(rng.integers(1, size - side))
                y0 = int(rng.integers(1, size - side))
                if all(x0 + side + gap <= o.box[0] or o.box[2] + gap <= x0 or
                       y0 + side + gap <= o.box[1] or o.box[3] + gap <= y0 for o in placed):
                    break
            else:
                ok = False
                break
            placed.append(ShapeObject(shape, color, (x0, y0), side, _tight(shape, x0, y0, side), j))
        if not ok:
            continue
        if all(relative_position(a.box, b.box, margin=LAYOUT_MARGIN) == {rel}
               and relative_position(a.box, b.box) == {rel}
               for j, rel, k in relations for a in placed if a.clause == j for b in placed if b.clause == k):
            return placed
    raise RuntimeError(f"could not lay out {dict(metadata)} at {size}px in {max_tries} tries")


def draw(objects: Sequence[ShapeObject], size: int = 64, seed: Any = 0, noise: float = 0.0,
         antialias: bool = False) -> np.ndarray:
    """Rasterise ``objects`` on the grey background: uint8 [size, size, 3]. ``noise``: standard deviation of
    i.i.d. Gaussian pixel noise as a fraction of 255 (e.g. 0.05; 0 = none); ``antialias``: 4 x 4 supersampled
    edges (else hard edges: every pixel is the background or a palette colour)."""
    size = int(size)
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = BACKGROUND
    for obj in objects:
        (sx0, sy0), side = obj.origin, int(obj.side)
        cov = shape_coverage(obj.shape, side, side, supersample=4 if antialias else 1)
        xs0, ys0 = max(sx0, 0), max(sy0, 0)
        xs1, ys1 = min(sx0 + side, size), min(sy0 + side, size)
        c = cov[ys0 - sy0 : ys1 - sy0, xs0 - sx0 : xs1 - sx0, None]
        region = canvas[ys0:ys1, xs0:xs1]
        region[:] = region * (1.0 - c) + np.asarray(PALETTE[obj.color], dtype=np.float64) * c
    if noise > 0:
        canvas += _rng(seed).normal(0.0, float(noise) * 255.0, canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render(metadata: Mapping[str, Any], size: int = 64, seed: Any = 0, noise: float = 0.0,
           antialias: bool = False) -> np.ndarray:
    """A valid image for a metadata row (:func:`layout` then :func:`draw`): uint8 [size, size, 3], the same for
    the same row, size, seed, noise and antialias (the layout depends only on the row, size and seed)."""
    rng = _rng(seed)
    return draw(layout(metadata, size, rng), size, rng, noise, antialias)


def render_batch(rows: Sequence[Mapping[str, Any]], size: int = 64, seed: int = 0, noise: float = 0.0,
                 antialias: bool = False) -> np.ndarray:
    """uint8 [N, size, size, 3]: image i is ``render(rows[i], size, seed=(seed, i), ...)``."""
    out = np.empty((len(rows), int(size), int(size), 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        out[i] = render(row, size, (int(seed), i), noise, antialias)
    return out


# ------------------------------------------------------------------------------------------------- detector

_PALETTE_ARR = np.asarray([PALETTE[c] for c in COLORS] + [BACKGROUND], dtype=np.float32)  # [K + 1, 3]


def segment(image: np.ndarray, max_dist: float = MAX_COLOR_DIST) -> np.ndarray:
    """int [H, W]: per pixel the index into :data:`COLORS` of its nearest palette colour, or -1 where the nearest
    is the background or farther than ``max_dist`` (RGB Euclidean)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {img.shape}")
    px = img.astype(np.float32)
    d2 = ((px[:, :, None, :] - _PALETTE_ARR[None, None]) ** 2).sum(-1)  # [H, W, K + 1]
    idx = d2.argmin(-1)
    best = np.take_along_axis(d2, idx[..., None], -1)[..., 0]
    labels = idx.astype(np.int16)
    labels[(idx == len(COLORS)) | (best > float(max_dist) ** 2)] = -1
    return labels


def shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    """(fill, asymmetry, aspect) of a component's bool mask cropped to its box: fill = area / box area
    (square 1, circle pi/4, triangle 1/2), asymmetry = the larger of |top - bottom| / area and
    |left - right| / area over the box halves (triangle 1/2, circle and square 0), aspect = width / height."""
    m = np.asarray(mask, dtype=np.float64)
    h, w = m.shape
    area = m.sum()
    if area <= 0:
        return 0.0, 0.0, 1.0

    def halves(profile: np.ndarray) -> float:
        n = len(profile)
        first = profile[: n // 2].sum() + (profile[n // 2] / 2 if n % 2 else 0.0)
        return abs(area - 2 * first) / area  # |second - first| / area

    asym = max(halves(m.sum(1)), halves(m.sum(0)))
    return float(area / (h * w)), float(asym), float(w / h)


def trim_protrusions(mask: np.ndarray, max_count: int = 2, jump: int = 3) -> np.ndarray:
    """A copy of a component's box-cropped bool mask without its first / last row / column where that line
    holds at most ``max_count`` pixels and the line next to it at least ``jump`` more (noise pixels stuck to a
    flat edge, which would stretch the box). Shapes lose nothing: a triangle's lines grow by <= 2 pixels."""
    m = np.array(mask, dtype=bool)
    for axis in (1, 0):  # rows (summed over columns), then columns
        counts = m.sum(axis)
        lines = np.flatnonzero(counts)
        if len(lines) < 3:
            continue
        first, last = lines[0], lines[-1]
        view = m if axis == 1 else m.T
        if counts[first] <= max_count and counts[first + 1] >= counts[first] + jump:
            view[first] = False
        if counts[last] <= max_count and counts[last - 1] >= counts[last] + jump:
            view[last] = False
    return m


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """(shape, confidence) of a component's bool mask cropped to its box; (None, 0) when it resembles no shape
    (elongated box, or features farther than 0.25 from every prototype). Confidence in (0.5, 1]:
    0.5 + 0.5 * min(1, m / 0.3) with m = (d2 - d1) / (d2 + d1) the margin between the nearest (d1) and second
    nearest (d2) prototype; clear shapes get 1.0 (kept by GenEval's 0.9 counting threshold)."""
    fill, asym, aspect = shape_features(mask)
    if not 1.0 / MAX_ASPECT <= aspect <= MAX_ASPECT:
        return None, 0.0
    dists = sorted((math.hypot(fill - pf, asym - pa), name) for name, (pf, pa) in PROTOTYPES.items())
    (d1, best), (d2, _) = dists[0], dists[1]
    if d1 > MAX_SHAPE_DIST:
        return None, 0.0
    margin = (d2 - d1) / (d2 + d1) if d2 + d1 > 0 else 0.0
    return best, 0.5 + 0.5 * min(1.0, margin / 0.3)


def _components(image: np.ndarray, min_area: float | None,
                max_dist: float) -> Iterator[tuple[int, np.ndarray, tuple[int, int, int, int]]]:
    """The candidate objects of :func:`detect`: per palette colour of :func:`segment`, its 8-connected components
    with at least ``min_area`` pixels (default max(6, 0.003 * H * W)), holes filled, rings dropped, edge noise
    trimmed. Yields (colour index, bool mask cropped to its box, box (x0, y0, x1, y1) exclusive)."""
    from scipy import ndimage  # the detector alone needs scipy (the "rewards" extra); prompts and rendering don't

    labels = segment(image, max_dist)
    h, w = labels.shape
    thr = max(MIN_AREA, MIN_AREA_FRAC * h * w) if min_area is None else float(min_area)
    eight = np.ones((3, 3), dtype=bool)
    for k in np.unique(labels):
        if k < 0:
            continue
        comp, _ = ndimage.label(labels == k, structure=eight)
        sizes = np.bincount(comp.ravel())
        for i, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sl is None or sizes[i] < thr:
                continue
            raw = comp[sl] == i
            crop = ndimage.binary_fill_holes(raw)
            if raw.sum() < MIN_SOLIDITY * crop.sum():  # a ring (e.g. a rim of blended colour)
                continue
            crop = trim_protrusions(crop)
            rows, cols = np.flatnonzero(crop.any(1)), np.flatnonzero(crop.any(0))
            crop = crop[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            y0, x0 = sl[0].start + int(rows[0]), sl[1].start + int(cols[0])
            yield int(k), crop, (x0, y0, x0 + crop.shape[1], y0 + crop.shape[0])


def detect(image: np.ndarray, *, min_area: float | None = None, max_dist: float = MAX_COLOR_DIST,
           masks: bool = False) -> list[Detection]:
    """Rule-based detections of one uint8 [H, W, 3] image: the connected components (8-connected) of each
    palette colour in :func:`segment` with at least ``min_area`` pixels (default max(6, 0.003 * H * W)); holes are
    filled, rings (pixels < 0.6 of the filled area, e.g. a rim of blended colour) dropped, noise pixels stuck to
    an edge trimmed (:func:`trim_protrusions`), and the rest classified by :func:`classify_shape` (components
    that resemble no shape are dropped). Each is a
    :class:`~flowgrpo.rewards.geneval.rules.Detection` with ``cls`` = shape, ``score`` = confidence, ``box`` =
    (x0, y0, x1, y1) with x1/y1 exclusive, ``color`` = palette name and ``mask`` (bool [H, W]) when
    ``masks=True``. Sorted by (y0, x0)."""
    h, w = np.asarray(image).shape[:2]
    out: list[Detection] = []
    for k, crop, (x0, y0, x1, y1) in _components(image, min_area, max_dist):
        shape, conf = classify_shape(crop)
        if shape is None:
            continue
        full = None
        if masks:
            full = np.zeros((h, w), dtype=bool)
            full[y0:y1, x0:x1] = crop
        out.append(Detection(shape, float(conf), (float(x0), float(y0), float(x1), float(y1)), full, COLORS[k]))
    out.sort(key=lambda d: (d.box[1], d.box[0]))
    return out


def shape_proximity(image: np.ndarray, metadata: Mapping[str, Any], *, min_area: float | None = None,
                    max_dist: float = MAX_COLOR_DIST) -> float:
    """A dense companion of the GenEval verdict, in [0, 1]: how close the image's objects are to the requested
    shapes, whether or not the detector already accepts them. Per include clause (shape, colour, count): each
    component of the clause's colour (any colour if none is named) gets ``max(0, 1 - d / PROXIMITY_SCALE)``,
    ``d`` = the distance of its :func:`shape_features` (fill, asymmetry, |log aspect|) from the requested shape's
    prototype (aspect 1); the clause scores the mean of its ``count`` best (missing objects count 0); the image
    the mean over clauses. A blob that is a little squarer than another scores a little higher for "a square",
    where the verdict sees two failures alike."""
    comps = [(k, shape_features(crop)) for k, crop, _ in _components(image, min_area, max_dist)]
    per_clause = []
    for clause in metadata.get("include", []):
        pf, pa = PROTOTYPES[clause["class"]]
        color = clause.get("color")
        want = COLORS.index(color) if color else None
        close = sorted((max(0.0, 1.0 - math.sqrt((f - pf) ** 2 + (a - pa) ** 2 + math.log(r) ** 2) / PROXIMITY_SCALE)
                        for k, (f, a, r) in comps if want is None or k == want), reverse=True)
        n = max(1, int(clause.get("count", 1)))
        per_clause.append(sum(close[:n]) / n)
    return float(np.mean(per_clause)) if per_clause else 0.0


def detect_batch(images: np.ndarray, **options: Any) -> list[list[Detection]]:
    """:func:`detect` per image of a uint8 [N, H, W, 3] batch (the geneval ``Detector`` interface)."""
    return [detect(im, **options) for im in np.asarray(images)]


class ShapesDetector:
    """:func:`detect` behind the geneval :class:`~flowgrpo.rewards.geneval.detector.Detector` interface."""

    def __init__(self, **options: Any):
        self.options = options

    def detect(self, images: np.ndarray) -> list[list[Detection]]:
        return detect_batch(images, **self.options)


def judge(image: np.ndarray, metadata: Mapping[str, Any], *, only_strict: bool = False,
          **detect_options: Any) -> dict[str, Any]:
    """The GenEval judgement of one image: ``{"correct", "strict_correct", "score", "tag", "reason",
    "standard_reason", "detections"}`` (the ``geneval`` reward's details; ``score`` = the partial-credit
    reward)."""
    res = evaluate(metadata, detect(image, **detect_options), only_strict=only_strict)
    return {"correct": res.correct, "strict_correct": res.strict_correct, "score": res.score, "tag": res.tag,
            "reason": res.reason, "standard_reason": res.standard_reason,
            "detections": [d.to_dict() for dets in res.detections.values() for d in dets]}


def score(image: np.ndarray, metadata: Mapping[str, Any], *, strict: bool = False,
          **detect_options: Any) -> tuple[bool, dict[str, Any]]:
    """(correct, details) of one image: ``correct`` is GenEval's standard verdict (``strict=True``: the exact
    count verdict), ``details`` as :func:`judge`."""
    details = judge(image, metadata, **detect_options)
    return bool(details["strict_correct"] if strict else details["correct"]), details


__all__ = [
    "BUILTIN_PROMPTS_PER_TAG", "builtin_prompt_set",
    "BACKGROUND", "COLORS", "COUNTING_COUNTS", "HELD_OUT_COMBOS", "HOLDOUTS", "PALETTE", "SHAPES", "SPLITS",
    "ShapeObject", "ShapesDetector", "TEST_FRACTION", "all_prompts", "classify_shape", "detect", "detect_batch",
    "draw", "judge", "layout", "make_row", "prompt_set", "render", "render_batch", "scene_key", "score", "segment",
    "shape_coverage", "shape_features", "shape_proximity", "split_of", "split_prompts", "trim_protrusions",
    "write_jsonl",
]
