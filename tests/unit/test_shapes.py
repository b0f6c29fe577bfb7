"""The shapes world (flowgrpo.eval.shapes) and the ``shapes`` reward: prompts and splits, GenEval metadata judged
by the unchanged GenEval rules, the renderer (checked pixel by pixel and by the detector), the rule-based
detector's accuracy, negative cases, and the reward through build_reward / WeightedReward."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from flowgrpo.eval import shapes as S
from flowgrpo.prompts import PromptSet, load_prompts
from flowgrpo.rewards import KNOWN_REWARDS, REGISTRY, WeightedReward, build_reward
from flowgrpo.rewards.geneval import COLORS as GENEVAL_COLORS
from flowgrpo.rewards.geneval import TAGS, Detection, evaluate, geneval_metrics, relative_position

SIZES = (32, 64, 128)


def rows_of_all_tags(n: int, seed: int) -> list[dict]:
    """n rows from both splits (train then test), balanced over the tags."""
    return S.prompt_set(n - n // 4, seed=seed, split="train").metadata + \
        S.prompt_set(n // 4, seed=seed, split="test").metadata


def truth(objs: list[S.ShapeObject]) -> list[Detection]:
    return [Detection(o.shape, 1.0, tuple(float(v) for v in o.box), None, o.color) for o in objs]


# ------------------------------------------------------------------------------------------- vocabulary


def test_vocabulary_is_separable_and_geneval_named():
    assert S.SHAPES == ("circle", "square", "triangle")
    assert 6 <= len(S.COLORS) <= 8 and set(S.COLORS) <= set(GENEVAL_COLORS)
    rgb = {c: np.asarray(v, dtype=float) for c, v in S.PALETTE.items()}
    for a, b in itertools.combinations(S.COLORS, 2):
        assert np.linalg.norm(rgb[a] - rgb[b]) >= 100, (a, b)
    for c in S.COLORS:
        assert np.linalg.norm(rgb[c] - np.asarray(S.BACKGROUND, dtype=float)) >= 120, c


def test_templates_and_metadata_format():
    assert S.make_row("single_object", [("red", "circle")]) == {
        "tag": "single_object", "include": [{"class": "circle", "count": 1, "color": "red"}],
        "prompt": "a photo of a red circle"}
    assert S.make_row("colors", [("orange", "square")])["prompt"] == "a photo of an orange square"
    assert S.make_row("counting", [("green", "triangle")], count=3) == {
        "tag": "counting", "include": [{"class": "triangle", "count": 3, "color": "green"}],
        "exclude": [{"class": "triangle", "count": 4}], "prompt": "a photo of three green triangles"}
    assert S.make_row("two_object", [("red", "circle"), ("red", "square")])["prompt"] == \
        "a photo of a red circle and a red square"
    assert S.make_row("color_attr", [("red", "circle"), ("blue", "triangle")]) == {
        "tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                         {"class": "triangle", "count": 1, "color": "blue"}],
        "prompt": "a photo of a red circle and a blue triangle"}
    # GenEval: "a photo of X right of Y" -> include [Y, X at ["right of", 0]]
    assert S.make_row("position", [("red", "circle"), ("blue", "square")], relation="right of") == {
        "tag": "position", "include": [{"class": "square", "count": 1, "color": "blue"},
                                       {"class": "circle", "count": 1, "color": "red", "position": ["right of", 0]}],
        "prompt": "a photo of a red circle right of a blue square"}
    with pytest.raises(ValueError):
        S.make_row("two_object", [("red", "circle"), ("blue", "circle")])  # same class twice
    with pytest.raises(ValueError):
        S.make_row("color_attr", [("red", "circle"), ("red", "square")])  # colour binding needs two colours
    with pytest.raises(ValueError):
        S.make_row("colors", [("pink", "circle")])
    with pytest.raises(ValueError):
        S.make_row("counting", [("red", "circle")], count=5)


def test_all_prompts_sizes_unique_and_accepted_by_the_rules():
    sizes = {"single_object": 24, "colors": 24, "counting": 72, "two_object": 384, "color_attr": 336,
             "position": 1536}
    for tag in TAGS:
        rows = S.all_prompts(tag)
        assert len(rows) == sizes[tag]
        assert len({r["prompt"] for r in rows}) == len(rows)
        for r in rows:
            assert r["tag"] == tag
            assert len({c["class"] for c in r["include"]}) == len(r["include"])  # a class in one clause only
            res = evaluate(r, [])  # no detections: the rules accept the row and fail it
            assert not res.correct and not res.strict_correct and res.score <= 0.0
    rows = S.all_prompts("colors")
    rows[0]["include"][0]["color"] = "changed"  # copies: the module's rows are not shared
    assert S.all_prompts("colors")[0]["include"][0]["color"] != "changed"


# ---------------------------------------------------------------------------------------- prompt sets


def test_prompt_set_is_deterministic():
    a, b = S.prompt_set(120, seed=3), S.prompt_set(120, seed=3)
    assert isinstance(a, PromptSet) and len(a) == 120
    assert a.prompts == b.prompts and a.metadata == b.metadata
    assert S.prompt_set(120, seed=4).prompts != a.prompts
    assert all(m["prompt"] == p for p, m in zip(a.prompts, a.metadata))
    assert len(S.prompt_set(0)) == 0
    with pytest.raises(ValueError):
        S.prompt_set(6, split="val")
    with pytest.raises(ValueError):
        S.prompt_set(6, holdout="random")


def test_prompt_set_is_balanced_over_tags():
    ps = S.prompt_set(600, seed=1)
    assert Counter(m["tag"] for m in ps.metadata) == {t: 100 for t in TAGS}
    counts = Counter(m["tag"] for m in S.prompt_set(8, seed=1).metadata)
    assert sorted(counts.values()) == [1, 1, 1, 1, 2, 2] and set(counts) == set(TAGS)
    # within a tag no repeats until the pool is used up
    ps = S.prompt_set(6 * 50, seed=2, split="train")
    for tag in ("two_object", "color_attr", "position", "counting"):
        assert len(S.split_prompts(tag, "train")) >= 50
        prompts = [m["prompt"] for m in ps.metadata if m["tag"] == tag]
        assert len(set(prompts)) == len(prompts) == 50
    pool = len(S.split_prompts("colors", "test"))
    ps = S.prompt_set(300, seed=2, split="test", tags=["colors"])  # a small pool: every prompt equally often
    assert set(Counter(ps.prompts).values()) <= {300 // pool, -(-300 // pool)} and len(set(ps.prompts)) == pool
    only = S.prompt_set(10, tags=["counting"])
    assert {m["tag"] for m in only.metadata} == {"counting"}


@pytest.mark.parametrize("holdout", S.HOLDOUTS)
def test_splits_are_disjoint_scenes(holdout):
    keys = {split: set() for split in S.SPLITS}
    for tag in TAGS:
        rows = {split: S.split_prompts(tag, split, holdout) for split in S.SPLITS}
        assert rows["train"] and rows["test"], tag
        assert len(rows["train"]) + len(rows["test"]) == len(S.all_prompts(tag))
        assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["test"]}
        for split in S.SPLITS:
            keys[split] |= {S.scene_key(r) for r in rows[split]}
    assert not keys["train"] & keys["test"]  # across tags too: no test scene under any training tag
    test_rows = S.prompt_set(300, seed=0, split="test", holdout=holdout).metadata
    assert all(S.split_of(r, holdout) == "test" for r in test_rows)
    train_rows = S.prompt_set(300, seed=0, split="train", holdout=holdout).metadata
    assert all(S.split_of(r, holdout) == "train" for r in train_rows)
    if holdout == "combos":
        for r in train_rows:
            assert not {(c["color"], c["class"]) for c in r["include"]} & S.HELD_OUT_COMBOS
    else:
        frac = sum(len(S.split_prompts(t, "test")) for t in TAGS) / sum(len(S.all_prompts(t)) for t in TAGS)
        assert 0.12 < frac < 0.3


def test_scene_key_is_order_free():
    a = S.make_row("two_object", [("red", "circle"), ("blue", "square")])
    b = S.make_row("two_object", [("blue", "square"), ("red", "circle")])
    assert S.scene_key(a) == S.scene_key(b)
    left = S.make_row("position", [("red", "circle"), ("blue", "square")], relation="left of")
    right = S.make_row("position", [("blue", "square"), ("red", "circle")], relation="right of")
    above = S.make_row("position", [("red", "circle"), ("blue", "square")], relation="above")
    assert S.scene_key(left) == S.scene_key(right) != S.scene_key(above)
    assert S.split_of(left) == S.split_of(right)


def test_jsonl_round_trip(tmp_path):
    ps = S.prompt_set(30, seed=5)
    loaded = load_prompts(str(S.write_jsonl(ps, tmp_path / "shapes" / "train.jsonl")))
    assert loaded.prompts == ps.prompts and loaded.metadata == ps.metadata
    line = (tmp_path / "shapes" / "train.jsonl").read_text().splitlines()[0]
    assert set(json.loads(line)) >= {"tag", "include", "prompt"}


# ------------------------------------------------------------------------------------------- renderer


@pytest.mark.parametrize("size", SIZES)
def test_layout_and_pixels_respect_the_prompt(size):
    rows = rows_of_all_tags(120, seed=size)
    bg = np.asarray(S.BACKGROUND, dtype=np.uint8)
    for i, row in enumerate(rows):
        objs = S.layout(row, size, seed=i)
        img = S.draw(objs, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        # counts, classes and colours as asked
        want = Counter((c["class"], c["color"]) for c in row["include"] for _ in range(c["count"]))
        assert Counter((o.shape, o.color) for o in objs) == want
        # inside the image with a 1 px border, no two boxes closer than the gap
        for o in objs:
            x0, y0, x1, y1 = o.box
            assert 1 <= x0 < x1 <= size - 1 and 1 <= y0 < y1 <= size - 1
            assert x1 - x0 >= 5 and y1 - y0 >= 5
        for a, b in itertools.combinations(objs, 2):
            gap = max(a.box[0] - b.box[2], b.box[0] - a.box[2], a.box[1] - b.box[3], b.box[1] - a.box[3])
            assert gap >= 2
        # relations hold by the GenEval rule on the true boxes, and only that relation
        for j, clause in enumerate(row["include"]):
            if "position" in clause:
                rel, k = clause["position"]
                for a in (o for o in objs if o.clause == j):
                    for b in (o for o in objs if o.clause == k):
                        assert relative_position(a.box, b.box) == {rel}
        # pixels: each object's box holds its colour where the shape is, the rest of the image is background
        covered = np.zeros((size, size), dtype=bool)
        for o in objs:
            x0, y0, x1, y1 = o.box
            pix = img[y0:y1, x0:x1]
            is_col = (pix == np.asarray(S.PALETTE[o.color], dtype=np.uint8)).all(-1)
            assert is_col.any(0).all() and is_col.any(1).all()  # the colour spans the tight box
            covered[y0:y1, x0:x1] |= is_col
            # one connected blob of the object's colour per object
            lab, n = ndimage.label(is_col, structure=np.ones((3, 3)))
            assert n == 1
        assert (img[~covered] == bg).all()
        # the same objects, judged by the rules from their true boxes: correct and strict
        res = evaluate(row, truth(objs))
        assert res.correct and res.strict_correct and res.score == 1.0, (row["prompt"], res.reason)


def test_render_is_deterministic_and_seeded():
    row = S.prompt_set(1, seed=0, tags=["counting"]).metadata[0]
    a, b = S.render(row, 64, seed=7, noise=0.05), S.render(row, 64, seed=7, noise=0.05)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, S.render(row, 64, seed=8, noise=0.05))
    # noise does not move the objects
    clean = S.render(row, 64, seed=7)
    assert np.abs(a.astype(int) - clean.astype(int)).mean() < 20
    assert S.layout(row, 64, seed=7) == S.layout(row, 64, seed=7)
    rows = S.prompt_set(5, seed=1).metadata
    batch = S.render_batch(rows, 48, seed=3, noise=0.02)
    assert batch.shape == (5, 48, 48, 3)
    for i, row in enumerate(rows):
        assert np.array_equal(batch[i], S.render(row, 48, seed=(3, i), noise=0.02))


def test_render_rejects_bad_metadata():
    with pytest.raises(ValueError):
        S.render({"tag": "single_object", "include": [{"class": "dog", "count": 1}]})
    with pytest.raises(ValueError):
        S.render({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "pink"}]})
    with pytest.raises(ValueError):
        S.render({"tag": "counting", "include": [{"class": "circle", "count": 3}],
                  "exclude": [{"class": "circle", "count": 2}]})
    # a clause without a colour gets a palette colour
    objs = S.layout({"tag": "single_object", "include": [{"class": "square", "count": 2}]}, 64, seed=0)
    assert len(objs) == 2 and all(o.color in S.PALETTE for o in objs)


# ------------------------------------------------------------------------------------------- detector


def test_classify_shape_on_ideal_masks():
    for side in (7, 9, 12, 20, 40):
        for shape in S.SHAPES:
            mask = S.shape_coverage(shape, side, side) > 0
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            got, conf = S.classify_shape(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
            assert got == shape and conf > 0.9, (shape, side, conf)
    assert S.classify_shape(np.ones((4, 12), dtype=bool)) == (None, 0.0)  # elongated: no shape
    ring = np.ones((12, 12), dtype=bool)
    ring[3:9, :] = False  # two bars: fill 0.5, no asymmetry -> nothing like a shape
    assert S.classify_shape(ring)[0] is None


def test_detector_finds_what_was_drawn():
    rows = rows_of_all_tags(60, seed=11)
    for i, row in enumerate(rows):
        objs = S.layout(row, 64, seed=i)
        dets = S.detect(S.draw(objs, 64, seed=i, noise=0.03), masks=True)
        assert len(dets) == len(objs), row["prompt"]
        for o in objs:
            match = [d for d in dets if d.cls == o.shape and d.color == o.color
                     and np.abs(np.subtract(d.box, o.box)).max() <= 1]
            assert len(match) == 1, (row["prompt"], o, [d.to_dict() for d in dets])
            d = match[0]
            assert d.score > 0.9 and d.mask is not None and d.mask.shape == (64, 64)
            assert d.mask.sum() > 0 and d.mask[int(d.box[1]) : int(d.box[3]), int(d.box[0]) : int(d.box[2])].sum() \
                == d.mask.sum()


def test_detector_accuracy_at_64px_with_mild_noise():
    """>= 99% of rendered images of every tag are judged correct (standard and strict) by detect + the rules."""
    rows = rows_of_all_tags(360, seed=0)
    images = S.render_batch(rows, 64, seed=1, noise=0.05)
    verdicts = [S.score(im, row) for im, row in zip(images, rows)]
    per_tag = Counter(r["tag"] for r in rows)
    assert set(per_tag) == set(TAGS) and min(per_tag.values()) >= 50
    std = np.mean([ok for ok, _ in verdicts])
    strict = np.mean([d["strict_correct"] for _, d in verdicts])
    bad = [(r["prompt"], d["reason"]) for r, (ok, d) in zip(rows, verdicts) if not d["strict_correct"]]
    assert std >= 0.99 and strict >= 0.99, bad[:5]


@pytest.mark.parametrize("size,antialias", [(32, False), (128, False), (64, True)])
def test_detector_accuracy_other_sizes_and_antialiasing(size, antialias):
    rows = rows_of_all_tags(72, seed=size)
    images = S.render_batch(rows, size, seed=2, noise=0.05, antialias=antialias)
    acc = np.mean([S.score(im, row, strict=True)[0] for im, row in zip(images, rows)])
    assert acc >= 0.97


def test_detector_ignores_background_and_noise():
    blank = np.empty((64, 64, 3), dtype=np.uint8)
    blank[:] = S.BACKGROUND
    assert S.detect(blank) == []
    rng = np.random.default_rng(0)
    noisy = np.clip(blank + rng.normal(0, 0.08 * 255, blank.shape), 0, 255).astype(np.uint8)
    assert S.detect(noisy) == []
    assert S.detect(np.full((64, 64, 3), 128, dtype=np.uint8)) == []  # unseen grey: background
    with pytest.raises(ValueError):
        S.detect(blank[..., 0])


# -------------------------------------------------------------------------------------- negative cases


def _image(row: dict, seed: int = 0) -> np.ndarray:
    return S.render(row, 64, seed=seed, noise=0.05)


def test_wrong_colour_count_relation_or_binding_fail():
    red_circle = S.make_row("colors", [("red", "circle")])
    img = _image(red_circle)
    assert S.score(img, red_circle)[0]
    ok, details = S.score(img, S.make_row("colors", [("blue", "circle")]))
    assert not ok and not details["strict_correct"] and details["score"] < 1.0 and "blue" in details["reason"]
    assert not S.score(img, S.make_row("single_object", [("red", "square")]))[0]  # wrong shape

    three = S.make_row("counting", [("green", "triangle")], count=3)
    for count in (2, 4):
        ok, details = S.score(_image(S.make_row("counting", [("green", "triangle")], count=count)), three)
        assert not ok and not details["strict_correct"] and details["score"] < 1.0
    assert S.score(_image(three), three)[0]

    left = S.make_row("position", [("red", "circle"), ("blue", "square")], relation="left of")
    for seed in range(5):
        img = _image(left, seed)
        assert S.score(img, left)[0]
        for rel in ("right of", "above", "below"):
            wrong = S.make_row("position", [("red", "circle"), ("blue", "square")], relation=rel)
            ok, details = S.score(img, wrong)
            assert not ok and not details["strict_correct"] and details["score"] < 1.0

    bound = S.make_row("color_attr", [("red", "circle"), ("blue", "triangle")])
    swapped = S.make_row("color_attr", [("blue", "circle"), ("red", "triangle")])
    img = _image(bound)
    assert S.score(img, bound)[0] and not S.score(img, swapped)[0]

    pair = S.make_row("two_object", [("red", "circle"), ("blue", "square")])
    ok, details = S.score(img, pair)  # the square is missing
    assert not ok and details["score"] < 1.0


# ---------------------------------------------------------------------------------------------- reward


def test_reward_registered_and_scores_a_batch():
    assert "shapes" in KNOWN_REWARDS and "shapes" in REGISTRY
    reward = build_reward("shapes")
    rows = rows_of_all_tags(24, seed=4)
    images = S.render_batch(rows, 64, seed=0, noise=0.02)
    out = reward(images, [r["prompt"] for r in rows], rows)
    assert out.scores.shape == (24,) and out.scores.dtype == np.float64
    assert np.all(out.scores == 1.0)
    assert len(out.details) == 24
    for d, row in zip(out.details, rows):
        assert set(d) == {"correct", "strict_correct", "score", "tag", "reason", "standard_reason", "detections"}
        assert d["correct"] and d["strict_correct"] and d["tag"] == row["tag"]
        assert all({"class", "score", "box", "color"} <= set(det) for det in d["detections"])
    # mismatched metadata: partial credit below 1, mirroring the geneval reward's scores
    shuffled = rows[1:] + rows[:1]
    wrong = reward(images, [r["prompt"] for r in shuffled], shuffled)
    assert np.all(wrong.scores < 1.0)
    for img, row, s in zip(images, shuffled, wrong.scores):
        assert s == evaluate(row, S.detect(img)).score
    # float [N, 3, H, W] in [0, 1] (what a pipeline decodes) is accepted
    floats = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    assert np.array_equal(reward(floats, [r["prompt"] for r in rows], rows).scores, out.scores)
    metrics = geneval_metrics(wrong.details)
    assert metrics["accuracy"].shape == (24,) and metrics["strict_accuracy"].max() == 0.0
    with pytest.raises(ValueError):
        reward(images, [r["prompt"] for r in rows], rows[:-1])
    with pytest.raises(ValueError):
        reward(images, [r["prompt"] for r in rows], [{}] * 24)
    strict_only = build_reward("shapes", only_strict=True)(images[:2], [], rows[:2])
    assert np.all(strict_only.scores == 1.0) and not any(d["correct"] for d in strict_only.details)


def _canvas(*masks_at: tuple[np.ndarray, str, int, int]) -> np.ndarray:
    img = np.empty((64, 64, 3), dtype=np.uint8)
    img[:] = S.BACKGROUND
    for mask, colour, y, x in masks_at:
        img[y : y + mask.shape[0], x : x + mask.shape[1]][mask] = S.PALETTE[colour]
    return img


def _rounded_square(side: int, radius: int) -> np.ndarray:
    """A square with its corners cut to quarter discs of ``radius`` (0: the square; side / 2: a disc)."""
    yy, xx = np.mgrid[:side, :side] + 0.5
    cy = np.clip(yy, radius, side - radius)
    cx = np.clip(xx, radius, side - radius)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2 + 1e-9


def test_shape_proximity_grades_what_the_verdict_calls_equal():
    row = S.make_row("single_object", [("blue", "square")])
    square, disc = _rounded_square(18, 0), _rounded_square(18, 9)
    # the rendered prompt is (near) perfect; a drawing of nothing scores 0
    assert S.shape_proximity(S.render(row, 64, seed=0), row) > 0.9
    assert S.shape_proximity(_canvas(), row) == 0.0
    # corners rounded more and more: monotonically less like a square, also among the ones the verdict calls
    # "circle" alike
    prox = [S.shape_proximity(_canvas((_rounded_square(18, r), "blue", 20, 20)), row) for r in (0, 3, 5, 7, 9)]
    assert prox == sorted(prox, reverse=True) and prox[0] > 0.95 and prox[-1] < 0.7, prox
    verdicts = [S.score(_canvas((_rounded_square(18, r), "blue", 20, 20)), row)[0] for r in (0, 3, 5, 7, 9)]
    assert verdicts == [True, True, True, False, False]
    # the colour is part of the request: the same square in red does not count; an extra red one changes nothing
    assert S.shape_proximity(_canvas((square, "red", 20, 20)), row) == 0.0
    assert S.shape_proximity(_canvas((square, "blue", 5, 5), (disc, "red", 35, 35)), row) == pytest.approx(
        S.shape_proximity(_canvas((square, "blue", 5, 5)), row))
    # counts: each missing object counts 0 (two of three squares -> 2/3 of three)
    three = S.make_row("counting", [("blue", "square")], count=3)
    two = S.shape_proximity(_canvas((square, "blue", 2, 2), (square, "blue", 2, 40)), three)
    full = S.shape_proximity(_canvas((square, "blue", 2, 2), (square, "blue", 2, 40), (square, "blue", 40, 20)),
                             three)
    assert two == pytest.approx(full * 2 / 3)


def test_shapes_reward_shaping_adds_the_proximity():
    rows = rows_of_all_tags(12, seed=8)
    images = S.render_batch(rows, 64, seed=1)
    wrong = rows[1:] + rows[:1]
    plain = build_reward("shapes")(images, [], wrong)
    shaped = build_reward("shapes", shaping=0.5)(images, [], wrong)
    prox = np.asarray([S.shape_proximity(im, r) for im, r in zip(images, wrong)])
    np.testing.assert_allclose(shaped.scores, plain.scores + 0.5 * prox)
    assert [d["correct"] for d in shaped.details] == [d["correct"] for d in plain.details]
    assert all(d["shape_proximity"] == pytest.approx(p) for d, p in zip(shaped.details, prox))
    with pytest.raises(ValueError, match="reward_options.shapes.shaping"):
        build_reward("shapes", shaping=-1.0)


def test_weighted_reward_with_shapes():
    rows = rows_of_all_tags(8, seed=6)
    images = S.render_batch(rows, 64, seed=0)
    wrong_rows = rows[1:] + rows[:1]
    metadata = rows[:4] + wrong_rows[4:]
    combo = WeightedReward({"shapes": 2.0, "jpeg_compressibility": 0.0})
    out = combo(images, [r["prompt"] for r in metadata], metadata)
    assert set(out) == {"shapes", "jpeg_compressibility", "avg"}
    assert np.all(out["shapes"][:4] == 1.0) and np.all(out["shapes"][4:] < 1.0)
    np.testing.assert_allclose(out["avg"], 2.0 * out["shapes"])
