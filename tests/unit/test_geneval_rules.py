"""GenEval rules (flowgrpo.rewards.geneval.rules): exhaustive checks over every row of the GenEval test metadata
with synthetic detections, plus hand-computed partial-credit scores, the margin rule and the benchmark summary.

No detector and no torch: detections are built directly (colours given on the detections)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from flowgrpo.rewards.geneval.rules import (COLORS, TAGS, Detection, aggregate, crop_object, evaluate,
                                            filter_detections, per_tag_columns, relative_position)

METADATA = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "prompts" / "geneval"
            / "test_metadata.jsonl")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    if not METADATA.is_file():
        pytest.skip(f"GenEval test metadata not found at {METADATA} (the shared data directory is not checked out)")
    out = [json.loads(line) for line in METADATA.read_text().splitlines() if line.strip()]
    assert len(out) == 2212
    return out


# ----------------------------------------------------------------------------------- synthetic detections

BOX = 40.0  # side of every synthetic box
STEP = 50.0  # spacing of objects of one clause
DISPLACE = 400.0  # distance of a positioned clause from its target clause
DIRECTION = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}


def _box(cx: float, cy: float) -> tuple[float, float, float, float]:
    return (cx - BOX / 2, cy - BOX / 2, cx + BOX / 2, cy + BOX / 2)


def anchors(meta: dict) -> list[tuple[float, float]]:
    """Centre of each include clause's group: free clauses far apart on a row, a positioned clause DISPLACE away
    from its target in the direction of its relation."""
    out: list[tuple[float, float]] = []
    for i, req in enumerate(meta["include"]):
        if "position" in req:
            rel, j = req["position"]
            dx, dy = DIRECTION[rel]
            out.append((out[j][0] + DISPLACE * dx, out[j][1] + DISPLACE * dy))
        else:
            out.append((1000.0 + 3000.0 * i, 1000.0))
    return out


def satisfying(meta: dict) -> list[list[Detection]]:
    """Per include clause: exactly ``count`` confident detections of the class, of the clause's colour, spread
    horizontally around the clause's anchor (so every required relation holds pairwise)."""
    groups = []
    for req, (ax, ay) in zip(meta["include"], anchors(meta)):
        n = req["count"]
        groups.append([Detection(req["class"], 0.99 - 0.01 * k, _box(ax + STEP * (k - (n - 1) / 2), ay),
                                 None, req.get("color")) for k in range(n)])
    return groups


def flat(groups: list[list[Detection]]) -> list[Detection]:
    return [d for g in groups for d in g]


def other_color(c: str) -> str:
    return COLORS[(COLORS.index(c) + 1) % len(COLORS)]


def has_attr(req: dict) -> bool:
    return "color" in req or "position" in req


def full_credits(req: dict) -> list[float]:
    """The credit list of a fully satisfied clause: count 1, colour 1, position 1."""
    return [1.0] + [1.0] * ("color" in req) + [1.0] * ("position" in req)


def check_all(rows: list[dict], fn) -> None:
    """Run ``fn(i, row)`` on every row; collect the failures and report the first few."""
    failures = []
    for i, row in enumerate(rows):
        try:
            fn(i, row)
        except AssertionError as e:
            failures.append(f"row {i} ({row['tag']}: {row['prompt']!r}): {e}")
    assert not failures, f"{len(failures)} rows failed, e.g.\n" + "\n".join(failures[:5])


# ---------------------------------------------------------------------------------- every metadata row


def test_metadata_shapes_the_tests_rely_on(rows):
    assert {r["tag"] for r in rows} == set(TAGS)
    for r in rows:
        for req in r["include"]:
            assert req["class"] and req["count"] >= 1
            if "position" in req:
                assert req["position"][1] < r["include"].index(req)
        assert len({req["class"] for req in r["include"]}) == len(r["include"])  # no class in two clauses


def test_exact_detections_are_correct_strict_and_score_one(rows):
    def fn(i, row):
        res = evaluate(row, flat(satisfying(row)))
        assert res.correct and res.strict_correct, (res.reason, res.standard_reason)
        assert res.score == 1.0
        assert res.reason == "" and res.standard_reason == ""
        assert res.tag == row["tag"]

    check_all(rows, fn)


def test_input_order_and_dict_form_do_not_matter(rows):
    rng = np.random.default_rng(0)

    def fn(i, row):
        dets = flat(satisfying(row))
        shuffled = [dets[k] for k in rng.permutation(len(dets))]
        by_class: dict[str, list[Detection]] = {}
        for d in dets:
            by_class.setdefault(d.cls, []).append(d)
        for inp in (shuffled, by_class):
            res = evaluate(row, inp)
            assert res.correct and res.strict_correct and res.score == 1.0

    check_all(rows, fn)


def test_one_object_missing(rows):
    """Drop the least confident object of clause k: both verdicts fail; clause k scores 1 - 1/count (+ a 0 when it
    has a colour/position); a clause positioned relative to clause k loses its target ([1, 0])."""

    def fn(i, row):
        for k, req in enumerate(row["include"]):
            groups = satisfying(row)
            groups[k] = groups[k][:-1]
            res = evaluate(row, flat(groups))
            assert not res.correct and not res.strict_correct
            assert f"expected {req['class']}>={req['count']}, found {req['count'] - 1}" in res.standard_reason
            credits: list[float] = []
            for j, other in enumerate(row["include"]):
                if j == k:
                    credits += [1 - 1 / req["count"]] + [0.0] * has_attr(req)
                elif "position" in other and other["position"][1] == k:
                    credits += [1.0, 0.0]  # count right, target clause failed
                else:
                    credits += full_credits(other)
            assert res.score == pytest.approx(np.mean(credits)), (credits, res.reason)

    check_all(rows, fn)


def test_one_object_missing_hand_checked_values(rows):
    """The same perturbation with the expected scores written out per prompt shape."""
    expected = {
        # counting n: L = [1 - 1/n]
        ("counting", 2): 1 - 1 / 2, ("counting", 3): 1 - 1 / 3, ("counting", 4): 1 - 1 / 4,
        ("single_object", 1): 0.0,  # L = [0]
        ("colors", 1): 0.0,  # L = [0, 0]
    }
    for row in rows:
        if len(row["include"]) != 1:
            continue
        n = row["include"][0]["count"]
        groups = satisfying(row)
        groups[0] = groups[0][:-1]
        assert evaluate(row, flat(groups)).score == pytest.approx(expected[(row["tag"], n)])
    # two-clause rows, object of clause 0 missing:
    #   two_object  L = [0, 1]          -> 1/2
    #   color_attr  L = [0, 0, 1, 1]    -> 1/2
    #   position    L = [0, 1, 0]       -> 1/3 (clause 1 has no target)
    two = {"two_object": 1 / 2, "color_attr": 1 / 2, "position": 1 / 3}
    for row in rows:
        if len(row["include"]) == 2:
            groups = satisfying(row)
            groups[0] = []
            assert evaluate(row, flat(groups)).score == pytest.approx(two[row["tag"]]), row


def test_one_object_too_many(rows):
    """An extra (least confident, still kept) object in clause k, same colour, same place: strict fails and clause
    k scores 1 - 1/count (+ 0); standard GenEval still passes unless an exclude clause forbids count+1 (counting:
    "two X" excludes 3 X)."""

    def fn(i, row):
        thr = 0.9 if row["tag"] == "counting" else 0.3
        for k, req in enumerate(row["include"]):
            groups = satisfying(row)
            last = groups[k][-1]
            x0, y0, x1, y1 = last.box
            groups[k].append(Detection(req["class"], thr + 0.005, (x0 + 5, y0, x1 + 5, y1), None, req.get("color")))
            res = evaluate(row, flat(groups))
            assert not res.strict_correct
            assert f"expected {req['class']}=={req['count']}, found {req['count'] + 1}" in res.reason
            excluded = any(ex["class"] == req["class"] and ex["count"] <= req["count"] + 1
                           for ex in row.get("exclude", []))
            assert res.correct == (not excluded), res.standard_reason
            if excluded:
                assert f"expected {req['class']}<{req['count'] + 1}" in res.standard_reason
            credits: list[float] = []
            for j, other in enumerate(row["include"]):
                if j == k:
                    credits += [1 - 1 / req["count"]] + [0.0] * has_attr(req)
                elif "position" in other and other["position"][1] == k:
                    credits += [1.0, 0.0]
                else:
                    credits += full_credits(other)
            assert res.score == pytest.approx(np.mean(credits))

    check_all(rows, fn)
    assert any("exclude" in r for r in rows) and any("exclude" not in r for r in rows)


def test_wrong_colour(rows):
    """One object of a colour clause gets another colour: both verdicts fail with a colour reason; the colour
    credit is (count - 1) / count."""
    n_checked = 0

    def fn(i, row):
        nonlocal n_checked
        for k, req in enumerate(row["include"]):
            if "color" not in req:
                continue
            n_checked += 1
            groups = satisfying(row)
            groups[k][0].color = other_color(req["color"])
            res = evaluate(row, flat(groups))
            assert not res.correct and not res.strict_correct
            assert f"expected {req['color']} {req['class']}" in res.reason
            assert f"expected {req['color']} {req['class']}" in res.standard_reason
            credits: list[float] = []
            for j, other in enumerate(row["include"]):
                credits += [1.0, (req["count"] - 1) / req["count"]] if j == k else full_credits(other)
            assert res.score == pytest.approx(np.mean(credits))

    check_all(rows, fn)
    assert n_checked == 376 + 2 * 400  # colors rows + both clauses of color_attr rows


def test_swapped_positions(rows):
    """Swap the boxes of the two clauses of a position prompt: the relation is reversed, both verdicts fail and the
    score is mean([1, 1, 0, 1]) = 0.75 (count, count, violation, the trailing 1)."""
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    n_checked = 0

    def fn(i, row):
        nonlocal n_checked
        if row["tag"] != "position":
            return
        n_checked += 1
        groups = satisfying(row)
        a, b = groups[0][0], groups[1][0]
        a.box, b.box = b.box, a.box
        res = evaluate(row, flat(groups))
        assert not res.correct and not res.strict_correct
        rel = row["include"][1]["position"][0]
        assert f"expected {row['include'][1]['class']} {rel} {row['include'][0]['class']}, found {opposite[rel]}" \
            in res.reason
        assert res.score == pytest.approx(0.75)

    check_all(rows, fn)
    assert n_checked == 400


def test_low_confidence_detections_are_ignored(rows):
    """Extra detections of every prompted class at (not above) the threshold, below it, and - for counting - at 0.5,
    change nothing."""

    def fn(i, row):
        thr = 0.9 if row["tag"] == "counting" else 0.3
        groups = satisfying(row)
        noise = []
        for req, g in zip(row["include"], groups):
            scores = [thr, thr - 0.05, 0.1] + ([0.5, 0.85] if row["tag"] == "counting" else [])
            noise += [Detection(req["class"], s, (0, 0, 10, 10), None, other_color(req.get("color", "red")))
                      for s in scores]
        res = evaluate(row, flat(groups) + noise)
        assert res.correct and res.strict_correct and res.score == 1.0
        assert sum(len(v) for v in res.detections.values()) == sum(len(g) for g in groups)

    check_all(rows, fn)


def test_object_below_threshold_counts_as_missing(rows):
    """Lowering an object's confidence to the threshold (not above it) is the same as removing it."""

    def fn(i, row):
        thr = 0.9 if row["tag"] == "counting" else 0.3
        groups = satisfying(row)
        groups[0][-1].score = thr
        res = evaluate(row, flat(groups))
        ref = satisfying(row)
        ref[0] = ref[0][:-1]
        ref_res = evaluate(row, flat(ref))
        assert (res.correct, res.strict_correct, res.score) == (ref_res.correct, ref_res.strict_correct,
                                                                ref_res.score)
        assert not res.strict_correct

    check_all(rows, fn)


def test_unrelated_objects_do_not_matter(rows):
    """Confident detections of classes the prompt does not mention (co-occurrence) change nothing."""

    def fn(i, row):
        used = {req["class"] for req in row["include"]} | {ex["class"] for ex in row.get("exclude", [])}
        other = next(c for c in ("person", "car", "dog", "cat") if c not in used)
        extra = [Detection(other, 0.99, _box(500 + 60 * k, 500), None, "red") for k in range(3)]
        res = evaluate(row, flat(satisfying(row)) + extra)
        assert res.correct and res.strict_correct and res.score == 1.0

    check_all(rows, fn)


# --------------------------------------------------------------------------------- hand-computed scores


def D(cls: str, score: float = 0.95, box=(0, 0, 10, 10), color: str | None = None) -> Detection:
    return Detection(cls, score, tuple(float(v) for v in box), None, color)


def test_counting_partial_credit_by_hand():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}]}
    two = [D("cup", 0.95), D("cup", 0.96)]
    res = evaluate(meta, two)
    assert res.score == pytest.approx(1 - 1 / 3)  # L = [1 - |3 - 2| / 3] = [0.667]
    assert not res.correct and not res.strict_correct
    res = evaluate(meta, two + [D("cup", 0.5)])  # 0.5 <= 0.9: ignored for counting
    assert res.score == pytest.approx(2 / 3)
    five = [D("cup", 0.91 + 0.01 * k) for k in range(5)]
    res = evaluate(meta, five)
    assert res.score == pytest.approx(1 - 2 / 3)  # L = [1 - |3 - 5| / 3] = [0.333]
    assert not res.correct  # top-3 exist but the exclude clause (>= 4 cups) fires
    assert "expected cup<4, found 5" in res.standard_reason


def test_n_found_counts_every_kept_detection_so_the_score_can_be_negative():
    meta = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}
    res = evaluate(meta, [D("bowl", 0.4 + 0.1 * k) for k in range(4)])
    assert res.score == pytest.approx(-2.0)  # L = [1 - |1 - 4| / 1] = [-2]
    assert res.correct and not res.strict_correct  # standard: at least one bowl, no exclude clause
    # at most 16 detections per class are kept: L = [1 - |1 - 16|] = [-14]
    res = evaluate(meta, [D("bowl", 0.31 + 0.01 * k) for k in range(20)])
    assert res.score == pytest.approx(-14.0)
    assert len(res.detections["bowl"]) == 16 and res.detections["bowl"][0].score == pytest.approx(0.5)
    meta2 = {"tag": "counting", "include": [{"class": "bowl", "count": 2}], "exclude": [{"class": "bowl", "count": 3}]}
    res = evaluate(meta2, [D("bowl", 0.95)] * 5)
    assert res.score == pytest.approx(-0.5)  # L = [1 - |2 - 5| / 2] = [-0.5]


def test_colour_partial_credit_by_hand():
    colors = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "purple"}]}
    assert evaluate(colors, [D("cup", color="purple")]).score == 1.0  # [1, 1]
    res = evaluate(colors, [D("cup", color="red")])
    assert res.score == pytest.approx(0.5)  # L = [1, 1 - |1 - 0| / 1] = [1, 0]
    assert "found 0 purple" in res.reason and "red" in res.reason
    # two cups, one purple: standard takes the most confident cup only
    res = evaluate(colors, [D("cup", 0.9, color="purple"), D("cup", 0.8, color="red")])
    assert res.correct and not res.strict_correct
    assert res.score == pytest.approx(0.0)  # L = [1 - |1 - 2| / 1, 0 (count wrong, clause has a colour)] = [0, 0]
    res = evaluate(colors, [D("cup", 0.8, color="purple"), D("cup", 0.9, color="red")])
    assert not res.correct  # the top cup is red
    attr = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                             {"class": "scissors", "count": 1, "color": "black"}]}
    res = evaluate(attr, [D("handbag", color="pink"), D("scissors", color="white")])
    assert res.score == pytest.approx(0.75)  # L = [1, 1, 1, 0]
    res = evaluate(attr, [D("handbag", color="pink"), D("handbag", 0.5, color="pink"), D("scissors", color="black")])
    assert res.score == pytest.approx(0.5)  # L = [0, 0, 1, 1]
    assert res.correct and not res.strict_correct
    # a colour count of several objects: 2 of 3 blue -> colour credit 1 - |3 - 2| / 3
    multi = {"tag": "colors", "include": [{"class": "car", "count": 3, "color": "blue"}]}
    res = evaluate(multi, [D("car", color="blue"), D("car", color="blue"), D("car", color="green")])
    assert res.score == pytest.approx((1 + 2 / 3) / 2)  # L = [1, 0.667]
    assert not res.correct and not res.strict_correct


POSITION = {"tag": "position", "prompt": "a photo of a cow right of a laptop",
            "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}]}


def test_position_partial_credit_by_hand():
    laptop = D("laptop", box=(0, 0, 100, 100))
    cow_right = D("cow", box=(300, 0, 400, 100))
    cow_left = D("cow", box=(-300, 0, -200, 100))
    res = evaluate(POSITION, [laptop, cow_right])
    assert res.correct and res.strict_correct and res.score == 1.0  # L = [1, 1, 1]
    res = evaluate(POSITION, [laptop, cow_left])
    assert not res.correct and not res.strict_correct
    assert res.score == pytest.approx(0.75)  # L = [1, 1, 0 (violation), 1 (the trailing 1)]
    assert "expected cow right of laptop, found left of" in res.reason
    res = evaluate(POSITION, [cow_right])
    assert res.score == pytest.approx(1 / 3)  # L = [0 (no laptop), 1 (one cow), 0 (no target)]
    assert "no target for cow" in res.reason
    res = evaluate(POSITION, [laptop])
    assert res.score == pytest.approx(1 / 3)  # L = [1, 0 (no cow), 0 (count wrong, clause has a position)]
    res = evaluate(POSITION, [laptop, cow_right, D("cow", 0.5, box=(-300, 0, -200, 100))])
    assert res.correct  # standard: the most confident cow is right of the laptop
    assert not res.strict_correct
    assert res.score == pytest.approx(1 / 3)  # L = [1, 1 - |1 - 2|, 0] = [1, 0, 0]
    res = evaluate(POSITION, [laptop, D("laptop", 0.5, box=(600, 0, 700, 100)), cow_right])
    assert res.correct  # standard uses the top laptop only
    assert res.score == pytest.approx(1 / 3)  # L = [0 (two laptops), 1, 0 (no target)]
    res = evaluate(POSITION, [laptop, D("cow", box=(5, 0, 105, 100))])  # overlapping: no relation at all
    assert res.score == pytest.approx(0.75) and "found no relation" in res.reason


def test_position_is_checked_against_every_target_object():
    meta = {"tag": "position", "include": [{"class": "dog", "count": 2},
                                           {"class": "cat", "count": 1, "position": ["above", 0]}]}
    dogs = [D("dog", 0.9, box=(0, 300, 50, 350)), D("dog", 0.8, box=(200, 300, 250, 350))]
    res = evaluate(meta, dogs + [D("cat", box=(100, 0, 150, 50))])  # above both dogs
    assert res.correct and res.strict_correct and res.score == 1.0
    # above the first dog (offset (0, -50) -> (0, -40) / 50) but only left of the second
    # (offset (-200, -50) -> (-190, -40) / 206 = (-0.92, -0.19))
    res = evaluate(meta, dogs + [D("cat", box=(0, 250, 50, 300))])
    assert not res.correct and not res.strict_correct
    assert res.score == pytest.approx(0.75)  # L = [1 (two dogs), 1 (one cat), 0 (violation), 1 (trailing)]
    assert "found left of" in res.reason


def test_only_strict_and_empty_include():
    meta = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}
    res = evaluate(meta, [D("bowl")], only_strict=True)
    assert res.strict_correct and not res.correct and res.score == 1.0
    res = evaluate({"tag": "single_object", "include": []}, [D("bowl")])
    assert res.correct and res.strict_correct and res.score == 0.0  # no credits -> 0, as upstream


def test_malformed_position_reference_raises():
    meta = {"tag": "position", "include": [{"class": "cow", "count": 1, "position": ["right of", 1]},
                                           {"class": "laptop", "count": 1}]}
    with pytest.raises(ValueError, match="earlier"):
        evaluate(meta, [D("cow"), D("laptop")])
    meta = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                           {"class": "cow", "count": 1, "position": ["inside", 0]}]}
    with pytest.raises(ValueError, match="relation"):
        evaluate(meta, [D("cow"), D("laptop")])


# ----------------------------------------------------------------------------------------- filtering


def test_filter_detections_thresholds_order_and_cap():
    dets = [D("cup", 0.3), D("cup", 0.3001), D("cup", 0.9), D("cup", 0.95), D("cup", 0.5), D("dog", 0.2)]
    kept = filter_detections(dets, "colors")
    assert [d.score for d in kept["cup"]] == [0.95, 0.9, 0.5, 0.3001]  # > 0.3, most confident first
    assert "dog" not in kept
    kept = filter_detections(dets, "counting")
    assert [d.score for d in kept["cup"]] == [0.95]  # > 0.9 (0.9 itself is dropped)
    many = [D("cup", 0.31 + 0.01 * k) for k in range(30)]
    kept = filter_detections(many, "two_object")
    assert len(kept["cup"]) == 16 and kept["cup"][0].score == pytest.approx(0.6)
    assert filter_detections([d for v in kept.values() for d in v], "two_object") == kept  # idempotent
    ties = [D("cup", 0.5, box=(k, 0, k + 1, 1)) for k in range(3)]
    assert [d.box[0] for d in filter_detections(ties, None)["cup"]] == [0, 1, 2]  # stable


# ------------------------------------------------------------------------------------- relative position


@pytest.mark.parametrize("box_a, box_b, expected", [
    # offset (-100, 0), shrink 0.1*(10+10)=2 -> (-98, 0) / 100 -> dx = -0.98
    ((0, 0, 10, 10), (100, 0, 110, 10), {"left of"}),
    ((100, 0, 110, 10), (0, 0, 10, 10), {"right of"}),
    ((0, 0, 10, 10), (0, 100, 10, 110), {"above"}),  # y grows downward: smaller y = above
    ((0, 100, 10, 110), (0, 0, 10, 10), {"below"}),
    # offset (100, 100) -> (98, 98) / 141.4 = (0.69, 0.69): two relations
    ((100, 100, 110, 110), (0, 0, 10, 10), {"right of", "below"}),
    # offset (-50, 30) -> (-48, 28) / 58.3 = (-0.82, 0.48): only left of
    ((0, 30, 10, 40), (50, 0, 60, 10), {"left of"}),
    # margin rule: 100-wide boxes 15 apart: |offset| 15 < 0.1*(100+100) = 20 -> shrunk to 0 -> no relation
    ((0, 0, 100, 100), (15, 0, 115, 100), set()),
    ((0, 0, 100, 100), (0, 19, 100, 119), set()),
    # offset (-30, -5) -> shrunk (-10, 0), normalised by the unshrunk |offset| 30.4 -> dx = -0.33: no relation
    ((0, 0, 100, 100), (30, 5, 130, 105), set()),
    # offset (-60, 0) -> (-40, 0) / 60 = -0.67 -> left of
    ((0, 0, 100, 100), (60, 0, 160, 100), {"left of"}),
    ((0, 0, 50, 50), (0, 0, 50, 50), set()),  # identical boxes
    # the margin uses both objects' sizes: a tiny box next to a big one: offset -60, shrink 0.1*(10+110) = 12
    ((0, 45, 10, 55), (5, 0, 115, 100), {"left of"}),
])
def test_relative_position(box_a, box_b, expected):
    assert relative_position(box_a, box_b) == expected


def test_relative_position_accepts_boxes_with_a_score_column():
    assert relative_position(np.array([0, 0, 10, 10, 0.9]), np.array([100, 0, 110, 10, 0.8])) == {"left of"}


def test_margin_rule_flips_at_the_threshold():
    # two 100x100 boxes offset horizontally by d: shrunk = d - 20; relation iff (d - 20) / d > 0.5 iff d > 40
    b = (0, 0, 100, 100)
    assert relative_position((39, 0, 139, 100), b) == set()
    assert relative_position((41, 0, 141, 100), b) == {"right of"}
    assert relative_position((20.0005, 0, 120.0005, 100), b) == set()  # shrunk 0.0005 < 1e-3: "both ~0"


# ------------------------------------------------------------------------------------------- colours


class FakeColours:
    """Names the colour of the non-grey pixels of each crop (pure red/green/blue test images)."""

    def __init__(self):
        self.calls: list[tuple[int, str]] = []
        self.crops: list[np.ndarray] = []

    def __call__(self, crops, classname):
        self.calls.append((len(crops), classname))
        out = []
        for c in crops:
            self.crops.append(c)
            px = c.reshape(-1, 3)
            px = px[(px != 153).any(axis=1)]
            mean = px.mean(axis=0) if len(px) else np.array([153, 153, 153])
            out.append(["red", "green", "blue"][int(np.argmax(mean))])
        return out


def _painted():
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[:] = (0, 0, 255)  # blue background
    img[10:20, 10:30] = (255, 0, 0)  # red object
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:20, 10:30] = True
    return img, mask


def test_crop_object_composites_mask_on_grey_and_crops_box():
    img, mask = _painted()
    det = Detection("car", 0.9, (8.4, 9.6, 32.5, 22.0), mask)  # box a little larger than the mask
    crop = crop_object(img, det)
    assert crop.shape == (22 - 10, 32 - 8, 3) and crop.dtype == np.uint8  # rounded: x 8..32, y 10..22
    colours = {tuple(p) for p in crop.reshape(-1, 3)}
    assert colours == {(255, 0, 0), (153, 153, 153)}  # the blue background is replaced by #999
    no_mask = crop_object(img, Detection("car", 0.9, (0, 0, 64, 64)))
    assert no_mask.shape == (64, 64, 3) and (no_mask == img).all()
    assert crop_object(img, Detection("car", 0.9, (70, 70, 70, 70))).shape == (1, 1, 3)  # clipped, >= 1 px


def test_colours_from_classifier_are_computed_once_and_reported():
    img, mask = _painted()
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    clf = FakeColours()
    det = Detection("car", 0.9, (10, 10, 30, 20), mask)
    res = evaluate(meta, [det], image=img, color_classifier=clf)
    assert res.correct and res.strict_correct and res.score == 1.0
    assert clf.calls == [(1, "car")]  # strict and standard share the classification
    assert res.detections["car"][0].color == "red" and det.color is None  # input not mutated
    # without the mask the crop is mostly blue
    res = evaluate(meta, [Detection("car", 0.9, (0, 0, 64, 64))], image=img, color_classifier=FakeColours())
    assert not res.correct and res.score == pytest.approx(0.5)
    # prompts without colour clauses never call the classifier
    clf = FakeColours()
    evaluate({"tag": "single_object", "include": [{"class": "car", "count": 1}]}, [det], image=img,
             color_classifier=clf)
    assert clf.calls == []


def test_colour_needed_without_classifier_raises():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    with pytest.raises(ValueError, match="colour"):
        evaluate(meta, [D("car")])


# ---------------------------------------------------------------------------------------- aggregation


def test_aggregate_is_the_mean_of_per_tag_means():
    results = ([("single_object", 1), ("single_object", 1), ("single_object", 0), ("single_object", 1)]  # 3/4
               + [("two_object", True), ("two_object", False)]  # 1/2
               + [("counting", 0), ("counting", 0), ("counting", 1)]  # 1/3
               + [("colors", 1)]  # 1
               + [("position", 0), ("position", 0), ("position", 0), ("position", 1), ("position", 1)]  # 2/5
               + [("color_attr", 1), ("color_attr", 0), ("color_attr", 0), ("color_attr", 0)])  # 1/4
    out = aggregate(results)
    assert out["single_object"] == pytest.approx(0.75)
    assert out["two_object"] == pytest.approx(0.5)
    assert out["counting"] == pytest.approx(1 / 3)
    assert out["colors"] == pytest.approx(1.0)
    assert out["position"] == pytest.approx(0.4)
    assert out["color_attr"] == pytest.approx(0.25)
    # (0.75 + 0.5 + 0.3333 + 1 + 0.4 + 0.25) / 6 = 3.2333 / 6 = 0.5389, not the pooled 10/19 = 0.5263
    assert out["overall"] == pytest.approx((0.75 + 0.5 + 1 / 3 + 1.0 + 0.4 + 0.25) / 6)
    assert out["overall"] != pytest.approx(10 / 19)
    assert set(out) == set(TAGS) | {"overall"}


def test_aggregate_partial_and_empty():
    out = aggregate([("counting", 1), ("counting", 0), ("colors", 1)])
    assert out == {"counting": 0.5, "colors": 1.0, "overall": 0.75}
    assert math.isnan(aggregate([])["overall"])


def test_aggregate_of_exact_detections_over_the_benchmark_is_one(rows):
    results = [(row["tag"], evaluate(row, flat(satisfying(row))).correct) for row in rows]
    assert aggregate(results) == {**{t: 1.0 for t in TAGS}, "overall": 1.0}


def test_per_tag_columns_use_minus_ten_placeholders():
    cols = per_tag_columns(["counting", "colors", "counting"], [1, 0, 0])
    assert set(cols) == set(TAGS)
    np.testing.assert_array_equal(cols["counting"], [1.0, -10.0, 0.0])
    np.testing.assert_array_equal(cols["colors"], [-10.0, 0.0, -10.0])
    np.testing.assert_array_equal(cols["single_object"], [-10.0, -10.0, -10.0])


def test_detection_to_dict():
    d = Detection("cup", np.float32(0.5), (1, 2, 3, 4), np.zeros((2, 2), bool), "red")
    out = d.to_dict()
    assert out == {"class": "cup", "score": 0.5, "box": [1.0, 2.0, 3.0, 4.0], "color": "red"}
    json.dumps(out)
    assert copy.deepcopy(d).cls == "cup"
