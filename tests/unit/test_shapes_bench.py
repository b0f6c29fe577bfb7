"""The shapes bench's judgements (flowgrpo.bench.shapes): the proxy verdicts and the gold metrics the training
reward does not see (exact scene, junk pixels, diversity), on rendered images with known answers; and the
preset's built-in prompt sets."""

from __future__ import annotations

import numpy as np
import pytest

from flowgrpo.bench.shapes import diversity, judge_image, summarize
from flowgrpo.eval import shapes as S
from flowgrpo.prompts import load_prompts


def _row(tag: str, k: int = 0) -> dict:
    return S.split_prompts(tag, "train")[k]


def test_a_rendered_scene_is_exact_and_clean():
    for tag in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
        row = _row(tag)
        j = judge_image(S.render(row, 64, seed=1), row)
        assert j["correct"] and j["strict"] and j["exact_scene"], (tag, j)
        assert j["reward"] == pytest.approx(1.0) and j["junk"] == 0.0 and j["tag"] == tag


def test_an_extra_shape_passes_geneval_but_not_the_gold_exact_scene():
    """GenEval's single-object rule ignores other classes; the gold metric does not."""
    row = next(r for r in S.split_prompts("single_object", "train") if r["include"][0]["class"] == "circle")
    color = row["include"][0].get("color") or "red"
    other = S.make_row("two_object", [(color, "circle"), ("blue" if color != "blue" else "green", "square")])
    image = S.render(other, 64, seed=2)  # the requested circle plus a blue square
    j = judge_image(image, row)
    assert j["correct"] and not j["exact_scene"]


def test_junk_counts_coloured_pixels_outside_every_shape():
    row = _row("single_object")
    image = S.render(row, 64, seed=3)
    bg = np.asarray(S.BACKGROUND, dtype=np.uint8)
    ys, xs = np.nonzero((image != bg).any(-1))
    assert len(ys)
    # a 2 x 2 speck of a palette colour in an empty corner: too small to be a shape, so it is junk
    corner = (slice(0, 2), slice(0, 2)) if ys.min() > 4 and xs.min() > 4 else (slice(62, 64), slice(62, 64))
    dirty = image.copy()
    dirty[corner] = S.PALETTE["red"]
    j = judge_image(dirty, row)
    assert j["junk"] == pytest.approx(4 / 64 ** 2)


def test_diversity_is_the_mean_pairwise_pixel_distance_within_groups():
    a = np.zeros((2, 2, 3), np.uint8)
    b = np.full((2, 2, 3), 255, np.uint8)
    c = np.full((2, 2, 3), 51, np.uint8)
    images = np.stack([a, b, a, c])
    # group 0: |a - b| = 1; group 1: |a - c| = 0.2 -> mean 0.6; a lone image adds no pair
    assert diversity(images, [0, 0, 1, 1]) == pytest.approx(0.6)
    assert diversity(images[:1], [0]) == 0.0


def test_summarize_averages_per_tag_like_geneval():
    j = [{"tag": "a", "correct": True, "strict": True, "reward": 1.0, "exact_scene": True, "junk": 0.0},
         {"tag": "a", "correct": False, "strict": False, "reward": 0.0, "exact_scene": False, "junk": 0.1},
         {"tag": "b", "correct": True, "strict": False, "reward": 0.5, "exact_scene": False, "junk": 0.2}]
    s = summarize(j)
    assert s["per_tag"] == {"a": 0.5, "b": 1.0} and s["overall"] == pytest.approx(0.75)
    assert s["strict"] == pytest.approx(0.25) and s["reward"] == pytest.approx(0.5)
    assert s["gold"]["exact_scene"] == pytest.approx(0.25) and s["gold"]["junk"] == pytest.approx(0.1)


def test_builtin_shapes_prompt_sets_are_balanced_and_held_out():
    train, test = load_prompts("builtin:shapes_train"), load_prompts("builtin:shapes_test")
    assert len(train) == 6 * 256 and len(test) == 6 * 16
    assert all(m["prompt"] == p for p, m in zip(train.prompts, train.metadata))
    for ps in (train, test):
        tags = [m["tag"] for m in ps.metadata]
        assert {t: tags.count(t) for t in set(tags)} == {t: len(ps) // 6 for t in set(tags)}
    assert not {S.scene_key(m) for m in train.metadata} & {S.scene_key(m) for m in test.metadata}
    assert load_prompts("builtin:shapes_test").prompts == test.prompts  # deterministic
    with pytest.raises(ValueError, match="shapes_train"):
        load_prompts("builtin:shapes_val")


# ------------------------------------------------------------------------------------ --eval-prompts files


def test_eval_prompt_files_must_hold_shapes_world_rows(tmp_path):
    from flowgrpo.bench.shapes import load_eval_prompts

    rows = [_row("single_object", 0), _row("position", 3)]
    good = S.write_jsonl(rows, tmp_path / "good.jsonl")
    assert load_eval_prompts(str(good)).prompts == [r["prompt"] for r in rows]

    def bad(name: str, row: dict) -> str:
        return str(S.write_jsonl([rows[0], row], tmp_path / f"{name}.jsonl"))

    with pytest.raises(ValueError, match=r"row 2 .*'tag' must be one of"):
        load_eval_prompts(bad("tag", {**rows[0], "tag": "animals"}))
    with pytest.raises(ValueError, match=r"row 2 .*'include'"):
        load_eval_prompts(bad("include", {"tag": "single_object", "prompt": "a photo of a dog"}))
    with pytest.raises(ValueError, match="not a shapes-world object"):
        load_eval_prompts(bad("dog", {**rows[0], "include": [{"class": "dog", "count": 1}]}))
    with pytest.raises(ValueError, match="not a shapes-world object"):
        load_eval_prompts(bad("pink", {**rows[0], "include": [{"class": "circle", "count": 1, "color": "pink"}]}))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_eval_prompts(str(tmp_path / "empty.jsonl"))


def test_a_bad_eval_prompt_file_fails_before_the_model_is_resolved(tmp_path, monkeypatch):
    from flowgrpo.bench import shapes as B
    from flowgrpo.models import loading

    def no_model(*a, **k):
        raise AssertionError("the model was resolved before the prompt file was checked")

    monkeypatch.setattr(loading, "resolve_model_path", no_model)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a photo of a dog", "tag": "single_object"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: row 1"):
        B.run_shapes_bench(model="shapes", eval_file=str(tmp_path / "bad.jsonl"), out_dir=str(tmp_path / "out"))


def test_per_prompt_accuracy_is_the_fraction_of_its_images_judged_correct(monkeypatch):
    from flowgrpo.bench import shapes as B
    from flowgrpo.prompts import PromptSet

    rows = [_row("single_object", 0), _row("single_object", 1), _row("counting", 2)]
    ps = PromptSet([r["prompt"] for r in rows], rows)
    by_prompt = {r["prompt"]: r for r in rows}
    blank = S.draw([], 64, np.random.default_rng(0), 0.0, False)

    def fake_generate(adapter, prompts, *, seeds, **kw):
        # row 0: every image right; row 1: right for even seeds only; row 2: never (a blank canvas)
        out = []
        for k, (p, seed) in enumerate(zip(prompts, seeds)):
            right = p == rows[0]["prompt"] or (p == rows[1]["prompt"] and k % 2 == 0)
            out.append(S.render(by_prompt[p], 64, seed=seed) if right else blank)
        return np.stack(out)

    monkeypatch.setattr(B, "generate", fake_generate)
    out = B.evaluate_adapter(None, ps, resolution=64, num_steps=1, guidance_scale=1.0, seeds_per_prompt=4,
                             per_prompt=True)
    assert out["per_prompt"] == {rows[0]["prompt"]: 1.0, rows[1]["prompt"]: 0.5, rows[2]["prompt"]: 0.0}
    assert out["per_tag"] == {"single_object": 0.75, "counting": 0.0}
    assert "per_prompt" not in B.evaluate_adapter(None, ps, resolution=64, num_steps=1, guidance_scale=1.0)
