"""Evaluation bookkeeping without a diffusion model: GenEval aggregation through the real evaluation loop on
synthetic detections (hand-computed per-tag and overall scores), the per-image JSONL (torn lines, resume),
verdicts, suite building from the shared prompt files, model identity and cache keys."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from flowgrpo.eval import EvalSettings, EvalStateError, Evaluator, Suite, SuiteError, build_suite
from flowgrpo.eval import cache as eval_cache
from flowgrpo.eval.results import ResultsError, ResultsLog, suite_metrics, verdict
from flowgrpo.prompts import PromptSet
from flowgrpo.rewards.geneval.rules import Detection

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "prompts"


def _need_data() -> Path:
    if not (DATA / "geneval" / "test_metadata.jsonl").is_file():
        pytest.skip(f"shared prompt data not found at {DATA} (the shared data directory is not checked out)")
    return DATA


# ------------------------------------------------------------------------------ a model-free evaluation

# one prompt per GenEval tag, plus a second single_object prompt; two images each
ROWS = [
    {"tag": "single_object", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]},
    {"tag": "two_object", "prompt": "a photo of a dog and a cat",
     "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]},
    {"tag": "counting", "prompt": "a photo of two cups", "include": [{"class": "cup", "count": 2}],
     "exclude": [{"class": "cup", "count": 3}]},
    {"tag": "colors", "prompt": "a photo of a red car", "include": [{"class": "car", "count": 1, "color": "red"}]},
    {"tag": "position", "prompt": "a photo of a cow right of a laptop",
     "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}]},
    {"tag": "color_attr", "prompt": "a photo of a pink handbag and a black scissors",
     "include": [{"class": "handbag", "count": 1, "color": "pink"},
                 {"class": "scissors", "count": 1, "color": "black"}]},
    {"tag": "single_object", "prompt": "a photo of a dog", "include": [{"class": "dog", "count": 1}]},
]


def _d(cls, score, box=(0, 0, 10, 10), color=None):
    return Detection(cls, score, box, None, color)


LEFT, RIGHT = (0, 0, 10, 10), (50, 0, 60, 10)
#: (prompt index, image index) -> detections; the comment is (standard, strict) correctness and partial credit
DETECTIONS = {
    (0, 0): [_d("cat", 0.9)],  # T T 1
    (0, 1): [_d("cat", 0.9), _d("cat", 0.8)],  # T F 0 (two cats: at least one, not exactly one)
    (1, 0): [_d("dog", 0.8), _d("cat", 0.7)],  # T T 1
    (1, 1): [_d("dog", 0.8)],  # F F 0.5
    (2, 0): [_d("cup", 0.95), _d("cup", 0.95), _d("cup", 0.5)],  # T T 1 (counting keeps > 0.9 only)
    (2, 1): [_d("cup", 0.95)] * 3,  # F F 0.5 (the exclude clause: 3 cups)
    (3, 0): [_d("car", 0.8, color="red")],  # T T 1
    (3, 1): [_d("car", 0.8, color="blue")],  # F F 0.5
    (4, 0): [_d("laptop", 0.8, LEFT), _d("cow", 0.8, RIGHT)],  # T T 1
    (4, 1): [_d("laptop", 0.8, RIGHT), _d("cow", 0.8, LEFT)],  # F F 0.75 ([1, 1, 0, 1])
    (5, 0): [_d("handbag", 0.8, color="pink"), _d("scissors", 0.8, color="black")],  # T T 1
    (5, 1): [_d("handbag", 0.8, color="pink"), _d("scissors", 0.8, color="white")],  # F F 0.75
    (6, 0): [_d("dog", 0.25)],  # F F 0 (below the 0.3 threshold)
    (6, 1): [_d("dog", 0.31)],  # T T 1
}


class _FakeSampler:
    """Images that carry their (prompt, image) ids in pixel (0, 0); counts its calls."""

    def __init__(self, suite: Suite, seed: int = 0):
        self.index = {p: i for i, p in enumerate(suite.prompts.prompts)}
        self.seed = seed
        self.calls = 0
        self.images = 0

    def __call__(self, prompts, seeds, metadata=None):
        from flowgrpo.eval.runner import image_seed

        self.calls += 1
        self.images += len(prompts)
        out = np.full((len(prompts), 16, 16, 3), 128, np.uint8)
        for b, (p, s) in enumerate(zip(prompts, seeds)):
            pi = self.index[p]
            ii = next(j for j in range(8) if image_seed(self.seed, pi, j) == s)
            out[b, 0, 0, :2] = (pi, ii)
        return out


class _FakeDetector:
    def __init__(self):
        self.calls = 0

    def detect(self, images):
        self.calls += 1
        return [list(DETECTIONS[(int(im[0, 0, 0]), int(im[0, 0, 1]))]) for im in images]


def _geneval_suite(detector: _FakeDetector) -> Suite:
    def build():
        from flowgrpo.rewards.geneval import GenEvalReward

        return GenEvalReward(detector=detector, lazy_color=True)

    return Suite("geneval", PromptSet([r["prompt"] for r in ROWS], ROWS), {"geneval": 1.0},
                 factories={"geneval": build}, images_per_prompt=2, primary="geneval/overall")


def _evaluator(suite: Suite, **kw) -> tuple[Evaluator, list[_FakeSampler]]:
    made: list[_FakeSampler] = []
    settings = EvalSettings(num_steps=2, resolution=16, batch_size=3, device="cpu", **kw)

    def factory(uri, revision):
        made.append(_FakeSampler(suite, settings.seed))
        return made[-1]

    return Evaluator(settings, cache_root="", sampler_factory=factory, progress=False), made


def test_geneval_aggregation_matches_hand_computed_scores(tmp_path):
    det = _FakeDetector()
    suite = _geneval_suite(det)
    ev, made = _evaluator(suite)
    res = ev.evaluate("fake-model", suite, tmp_path / "geneval", use_cache=False)
    m = res.metrics
    # per-image correctness -> per-tag accuracy = mean over that tag's images
    assert m["geneval/single_object"] == pytest.approx(3 / 4)  # (0,0) (0,1) (6,1) correct, (6,0) not
    for tag in ("two_object", "counting", "colors", "position", "color_attr"):
        assert m[f"geneval/{tag}"] == pytest.approx(1 / 2), tag
    # overall = unweighted mean of the six per-tag accuracies (not the image mean 8/14)
    assert m["geneval/overall"] == pytest.approx((3 / 4 + 5 * 1 / 2) / 6)
    assert m["geneval/image_accuracy"] == pytest.approx(8 / 14)
    # exact counts: the two-cat image fails
    assert m["geneval/strict_single_object"] == pytest.approx(2 / 4)
    assert m["geneval/strict_overall"] == pytest.approx((2 / 4 + 5 * 1 / 2) / 6)
    # partial-credit reward: mean of the per-image scores listed in DETECTIONS
    assert m["geneval/geneval"] == pytest.approx(10 / 14)
    assert m["geneval/avg"] == pytest.approx(10 / 14)
    assert m["geneval/n"] == 14 and m["geneval/n_prompts"] == 7
    # per-image records carry the verdicts and the detections
    rec = {(r["prompt_index"], r["image_index"]): r for r in res.records}
    assert rec[(0, 1)]["passed"] is True and rec[(0, 1)]["strict_passed"] is False
    assert rec[(4, 1)]["passed"] is False and rec[(4, 1)]["scores"]["geneval"] == pytest.approx(0.75)
    dets = rec[(5, 1)]["details"]["geneval"]["detections"]
    assert {d["class"]: d["color"] for d in dets} == {"handbag": "pink", "scissors": "white"}
    assert rec[(2, 0)]["category"] == "counting" and rec[(2, 0)]["details"]["geneval"]["correct"] is True
    lines = (tmp_path / "geneval" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 14 and all(json.loads(ln)["image"].startswith("images/") for ln in lines)
    assert all((tmp_path / "geneval" / json.loads(ln)["image"]).is_file() for ln in lines)
    assert made[0].calls == 5 and made[0].images == 14  # batches of 3


def test_suite_metrics_on_hand_made_records():
    recs = [
        {"prompt_index": 0, "image_index": 0, "category": "a", "scores": {"r": 1.0}, "avg": 1.0, "passed": True,
         "strict_passed": True, "details": {"r": {"correct": True}}},
        {"prompt_index": 0, "image_index": 1, "category": "a", "scores": {"r": 0.0}, "avg": 0.0, "passed": False,
         "strict_passed": False, "details": {"r": {"correct": False}}},
        {"prompt_index": 1, "image_index": 0, "category": "b", "scores": {"r": 0.5}, "avg": 0.5, "passed": False,
         "strict_passed": False, "details": {"r": {"correct": False}}},
    ]
    m = suite_metrics("s", recs)
    assert m["s/a"] == 0.5 and m["s/b"] == 0.0 and m["s/overall"] == 0.25
    assert m["s/r"] == pytest.approx(0.5) and m["s/r_std"] == pytest.approx(np.std([1.0, 0.0, 0.5]))
    assert m["s/n"] == 3 and m["s/n_prompts"] == 2
    # OCR: exact rendering is the verdict; a reward without verdicts has none
    assert verdict({"ocr": 1.0}, {"ocr": {"target": "hi", "distance": 0}}) == (True, True)
    assert verdict({"ocr": 0.5}, {"ocr": {"target": "hi", "distance": 1}}) == (False, False)
    assert verdict({"pickscore": 0.8}, {"pickscore": {"cos": 0.2}}) == (None, None)
    ocr = suite_metrics("ocr", [{"prompt_index": 0, "image_index": 0, "scores": {"ocr": 1.0}, "avg": 1.0,
                                 "passed": True, "details": {"ocr": {"distance": 0}}},
                                {"prompt_index": 1, "image_index": 0, "scores": {"ocr": 0.5}, "avg": 0.5,
                                 "passed": False, "details": {"ocr": {"distance": 2}}}])
    assert ocr["ocr/accuracy"] == 0.5 and ocr["ocr/ocr"] == 0.75 and "ocr/overall" not in ocr


def test_resume_scores_only_missing_images_and_drops_a_torn_line(tmp_path, caplog):
    det = _FakeDetector()
    suite = _geneval_suite(det)
    ev, made = _evaluator(suite)
    work = tmp_path / "g"
    full = ev.evaluate("fake-model", suite, work, use_cache=False)
    path = work / "results.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    # a crash after 5 images, in the middle of writing the 6th line
    path.write_bytes(b"".join(lines[:5]) + lines[5][:17])
    ev2, made2 = _evaluator(suite)
    with caplog.at_level(logging.INFO, logger="flowgrpo.eval"):
        res = ev2.evaluate("fake-model", suite, work, use_cache=False)
    assert "resuming candidate fake-model on geneval: 5 of 14 images already scored" in caplog.text
    assert made2[0].images == 9 and res.stats["sampled"] == 9 and res.stats["resumed"] == 5
    after = path.read_bytes().splitlines(keepends=True)
    assert after[:5] == lines[:5] and len(after) == 14  # the torn line is gone, done lines untouched
    keys = [(json.loads(ln)["prompt_index"], json.loads(ln)["image_index"]) for ln in after]
    assert len(set(keys)) == 14
    assert res.metrics == full.metrics
    # everything done: a third run samples nothing and loads no model
    ev3, made3 = _evaluator(suite)
    assert ev3.evaluate("fake-model", suite, work, use_cache=False).metrics == full.metrics and made3 == []


def test_results_log_rejects_corruption_before_the_last_line(tmp_path):
    p = tmp_path / "r.jsonl"
    log = ResultsLog(p)
    log.append([{"prompt_index": 0, "image_index": 0}])
    assert log.load() == [{"prompt_index": 0, "image_index": 0}]
    p.write_bytes(p.read_bytes() + b"{not json\n" + b'{"prompt_index": 1, "image_index": 0}\n')
    with pytest.raises(ResultsError, match="line 2"):
        log.load()


def test_other_settings_in_the_directory_are_refused_unless_restart(tmp_path):
    suite = _geneval_suite(_FakeDetector())
    ev, _ = _evaluator(suite)
    ev.evaluate("fake-model", suite, tmp_path / "g", use_cache=False)
    ev2, made = _evaluator(suite, seed=7)
    with pytest.raises(EvalStateError, match="settings"):
        ev2.evaluate("fake-model", suite, tmp_path / "g", use_cache=False)
    res = ev2.evaluate("fake-model", suite, tmp_path / "g", use_cache=False, restart=True)
    assert res.stats["sampled"] == 14 and made[0].images == 14


def test_cache_hit_skips_sampling(tmp_path):
    suite = _geneval_suite(_FakeDetector())
    cache_root = str(tmp_path / "cache")
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"w")
    ev, made = _evaluator(suite)
    ev.cache_root = cache_root
    first = ev.evaluate(str(model), suite, tmp_path / "a", role="base")
    assert first.stats["cache"] == "miss" and made[0].images == 14
    ev2, made2 = _evaluator(suite)
    ev2.cache_root = cache_root
    second = ev2.evaluate(str(model), suite, tmp_path / "b", role="base")
    assert second.stats["cache"] == "hit" and made2 == [] and ev2.samplers_loaded == 0
    assert second.metrics == first.metrics and len(second.records) == 14
    assert second.image_path(second.records[0]) is not None
    # other weights (the file changed) -> another key -> a miss
    (model / "weights.bin").write_bytes(b"other")
    ev3, made3 = _evaluator(suite)
    ev3.cache_root = cache_root
    assert ev3.evaluate(str(model), suite, tmp_path / "c", role="base").stats["cache"] == "miss"


def test_model_identity_of_published_dirs_and_hub_ids(tmp_path):
    from flowgrpo import storage

    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"weights")
    storage.publish_dir(src, tmp_path / "pub")
    ident = eval_cache.model_identity(str(tmp_path / "pub"))
    assert ident["cacheable"] and len(ident["manifest_sha256"]) == 64
    assert eval_cache.model_identity("org/model")["cacheable"] is False
    assert eval_cache.model_identity("org/model", "abc123") == {"uri": "org/model", "revision": "abc123",
                                                                 "cacheable": True}
    assert eval_cache.cache_key({"cacheable": False}, {}, {}) is None
    k1 = eval_cache.cache_key(ident, {"name": "ocr"}, {"num_steps": 40})
    assert k1 == eval_cache.cache_key(ident, {"name": "ocr"}, {"num_steps": 40})
    assert k1 != eval_cache.cache_key(ident, {"name": "ocr"}, {"num_steps": 10})


def test_optional_rewards_are_skipped_with_the_reason(tmp_path):
    class Boom:
        def __call__(self, images, prompts, metadata):
            raise ConnectionError("endpoint down")

    class Const:
        def __call__(self, images, prompts, metadata):
            from flowgrpo.rewards import RewardOutput

            return RewardOutput(np.full(len(images), 0.5))

    suite = Suite("drawbench", PromptSet(["a", "b", "c"]), {"pickscore": 1.0, "unifiedreward": 0.0, "deqa": 0.0},
                  optional=frozenset({"pickscore", "unifiedreward", "deqa"}),
                  factories={"pickscore": Const, "unifiedreward": Boom})
    ev, _ = _evaluator(suite)
    res = ev.evaluate("m", suite, tmp_path / "d", use_cache=False)
    assert set(res.skipped) == {"unifiedreward", "deqa"}
    assert "endpoint down" in res.skipped["unifiedreward"] and "not available" in res.skipped["deqa"]
    assert res.metrics["drawbench/pickscore"] == 0.5 and res.metrics["drawbench/avg"] == 0.5
    assert "drawbench/unifiedreward" not in res.metrics
    assert json.loads((tmp_path / "d" / "skipped.json").read_text()).keys() == {"unifiedreward", "deqa"}
    # a required reward that cannot be built fails the evaluation
    bad = Suite("x", PromptSet(["a"]), {"deqa": 1.0})
    with pytest.raises(Exception, match="deqa"):
        ev.evaluate("m", bad, tmp_path / "x", use_cache=False)


# ------------------------------------------------------------------------------------------------ suites


def test_suites_from_the_shared_prompt_files():
    root = _need_data()
    g = build_suite("geneval", data_root=root)
    assert len(g.prompts) == 553 and g.images_per_prompt == 4 and g.primary == "geneval/overall"
    assert {m["tag"] for m in g.prompts.metadata} == {"single_object", "two_object", "counting", "colors",
                                                      "position", "color_attr"}
    d = build_suite("drawbench", data_root=root, num_prompts=20)
    assert len(d.prompts) == 20 and d.rewards["pickscore"] == 1.0 and d.optional == frozenset(d.rewards)
    assert set(d.rewards) == {"pickscore", "imagereward", "aesthetic", "clipscore", "unifiedreward", "deqa"}
    assert len(build_suite("drawbench", data_root=root).prompts) == 200
    o = build_suite("ocr", data_root=root, num_prompts=5, images_per_prompt=2)
    assert o.rewards == {"ocr": 1.0} and o.images_per_prompt == 2 and '"' in o.prompts.prompts[0]
    p = build_suite("pickscore", data_root=root, num_prompts=3)
    assert p.rewards == {"pickscore": 1.0} and p.source.endswith("pickscore_sfw/test.txt")


def test_suite_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWGRPO_EVAL_DATA", raising=False)
    with pytest.raises(SuiteError, match="data root"):
        build_suite("ocr")
    with pytest.raises(SuiteError, match="not found"):
        build_suite("ocr", data_root=tmp_path)
    with pytest.raises(SuiteError, match="unknown eval suite"):
        build_suite("nope")
    with pytest.raises(SuiteError, match="--preset"):
        build_suite("preset")


def test_shapes_suite_or_a_clear_error(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("flowgrpo.eval.shapes") is None:
        with pytest.raises(SuiteError, match="flowgrpo.eval.shapes"):
            build_suite("shapes", num_prompts=6)
        return
    s = build_suite("shapes", num_prompts=12)
    assert s.rewards == {"shapes": 1.0} and s.primary == "shapes/overall" and len(s.prompts) <= 12
    assert all("include" in m for m in s.prompts.metadata)
    # a build without the module: a clear error, not an ImportError traceback
    import sys

    monkeypatch.setitem(sys.modules, "flowgrpo.eval.shapes", None)
    with pytest.raises(SuiteError, match="flowgrpo.eval.shapes"):
        build_suite("shapes", num_prompts=6)


def test_settings_follow_the_training_config_speed_settings(tiny_model_dir):
    """model.compile / malloc_tune of the training config reach the evaluation's sampler; they are not part of the
    fingerprint (same images up to fp32 rounding), so cached results stay valid."""
    from flowgrpo.config import load_config
    from flowgrpo.eval.runner import Sampler
    from flowgrpo.runtime import is_compiled

    preset = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
    s = EvalSettings.from_config(load_config(preset, ["model.compile=true", "malloc_tune=false"]))
    assert s.compile is True and s.malloc_tune is False
    assert s.fingerprint() == EvalSettings.from_config(load_config(preset)).fingerprint()
    assert is_compiled(Sampler.load(str(tiny_model_dir), s).adapter.transformer)
    plain = EvalSettings.from_config(load_config(preset))
    assert not is_compiled(Sampler.load(str(tiny_model_dir), plain).adapter.transformer)
