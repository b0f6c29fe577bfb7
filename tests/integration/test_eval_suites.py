"""End-to-end evaluation of the tiny SD3 on 20-prompt slices of every suite with tiny random reward models
(offline), the report it writes (parsed, and rendered in headless Chromium when available), the base-model cache
and the pipeline's evaluate step (MLflow metrics and artifacts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from flowgrpo.eval import EvalSettings, Evaluator, build_suite, run_eval
from flowgrpo.eval.runner import Sampler
from flowgrpo.eval.testing import chromium_binary, parse_report, render_report, tiny_reward_options

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "prompts"
HAS_SHAPES = importlib.util.find_spec("flowgrpo.eval.shapes") is not None
TAGS = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def _need_data() -> Path:
    if not (DATA / "geneval" / "test_metadata.jsonl").is_file():
        pytest.skip(f"shared prompt data not found at {DATA} (the shared data directory is not checked out)")
    return DATA


def _settings(**kw) -> EvalSettings:
    return EvalSettings(**{"num_steps": 4, "guidance_scale": 4.5, "resolution": 32, "batch_size": 10,
                           "device": "cpu", "max_sequence_length": 16, "num_prompts": 20, "threads": 1, **kw})


@pytest.fixture(scope="module")
def tiny_rewards(tmp_path_factory):
    return tiny_reward_options(tmp_path_factory.mktemp("tiny_rewards"))


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One sqlite MLflow store for the module (creating one costs seconds)."""
    from flowgrpo.tracking import check_tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    check_tracking(uri, "eval-test")
    return uri


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from flowgrpo.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-seed1", "tiny", seed=1)


def test_every_suite_end_to_end_with_report(tiny_model_dir, other_model_dir, tiny_rewards, tmp_path):
    data = _need_data()
    names = ["geneval", "drawbench", "ocr", "pickscore"] + (["shapes"] if HAS_SHAPES else [])
    settings = _settings(images_per_prompt=1, batch_size=20)
    suites = [build_suite(n, None, data, num_prompts=20, images_per_prompt=1, reward_options=tiny_rewards)
              for n in names]
    run = run_eval(str(tiny_model_dir), suites, settings, tmp_path / "out", base=str(other_model_dir),
                   cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"report.html", "report.md", "metrics.json", "candidate", "base"}
    cm, bm = run.candidate, run.base
    # GenEval: per-tag accuracies of the tags in the slice, overall, per-image detections
    geneval = next(s for s in suites if s.name == "geneval")
    tags = {m["tag"] for m in geneval.prompts.metadata}
    assert tags == TAGS  # the first 20 unique prompts cover every task
    assert {t for t in TAGS if f"geneval/{t}" in cm} == tags and "geneval/overall" in cm
    assert 0.0 <= cm["geneval/overall"] <= 1.0 and cm["geneval/n"] == 20
    g = next(r for r in run.results["candidate"] if r.suite == "geneval")
    assert all(isinstance(r["details"]["geneval"]["detections"], list) for r in g.records)
    assert any(r["details"]["geneval"]["detections"] for r in g.records)  # the biased tiny detector sees things
    assert all(isinstance(r["passed"], bool) for r in g.records)
    # DrawBench: mean and std of each available reward model, the others skipped with the reason
    for r in ("pickscore", "aesthetic", "clipscore"):
        assert f"drawbench/{r}" in cm and f"drawbench/{r}_std" in cm and f"drawbench/{r}" in bm
    d = next(r for r in run.results["candidate"] if r.suite == "drawbench")
    assert set(d.skipped) == {"imagereward", "unifiedreward", "deqa"}
    assert "127.0.0.1:9" in d.skipped["unifiedreward"] and "not available" in d.skipped["deqa"]
    assert "drawbench/unifiedreward" not in cm
    assert cm["drawbench/avg"] == cm["drawbench/pickscore"]
    # OCR and PickScore suites
    assert 0.0 <= cm["ocr/ocr"] <= 1.0 and "ocr/accuracy" in cm and cm["ocr/n"] == 20
    assert "pickscore/pickscore" in cm and cm["pickscore/n_prompts"] == 20
    if HAS_SHAPES:
        assert "shapes/overall" in cm and cm["shapes/n"] == 20
    # the two models differ (other weights), the gate compares them on the first suite's primary metric
    assert run.gate_metric == "geneval/overall" and run.passed is not None
    assert cm["pickscore/pickscore"] != bm["pickscore/pickscore"]
    # every image has a thumbnail and a JSONL line
    for role in ("candidate", "base"):
        for s in names:
            lines = (out / role / s / "results.jsonl").read_text().splitlines()
            assert len(lines) == 20 and all((out / role / s / json.loads(ln)["image"]).is_file() for ln in lines)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["metrics"]["candidate"]["geneval/overall"] == cm["geneval/overall"]
    assert summary["runs"]["base"]["ocr"]["cache"] == "miss" and summary["skipped"]["drawbench"]

    # the report: parsed
    page = (out / "report.html").read_text()
    facts = parse_report(page)
    assert facts["external"] == [] and facts["suites"] == names
    assert set(facts["categories"]["geneval"]) == tags and facts["categories"]["ocr"] == ["all"]
    header, *rows = facts["metrics_rows"]
    assert header == ["metric", "candidate", "base", "Δ base"]
    assert {r[0] for r in rows} == set(cm)
    assert all(f["img"].startswith("data:image/jpeg;base64,") for f in facts["figures"])
    gfig = [f for f in facts["figures"] if f["suite"] == "geneval"]
    assert gfig and {f["class"] for f in gfig} <= {"pass", "fail"} and {f["role"] for f in gfig} == {"candidate",
                                                                                                       "base"}
    assert "reward <b>deqa</b> skipped" in page and len(page) < 3_000_000
    md = (out / "report.md").read_text()
    assert "| **geneval/overall** |" in md and "`imagereward` skipped" in md

    # ... and rendered by a browser
    if chromium_binary() is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium): the report was checked by parsing only")
    seen = render_report(out / "report.html")
    assert seen["dom_has_metrics_table"] and seen["table_rows"] == len(rows) + 1 and seen["table_height"] > 100
    assert seen["images"] == len(facts["figures"]) and seen["images_ok"] == seen["images"]
    assert seen["grids_visible"] == seen["grids"] == sum(len(v) for v in facts["categories"].values())


def test_base_evaluation_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    data = _need_data()
    suite = build_suite("ocr", None, data, num_prompts=6)
    settings = _settings(num_prompts=6, batch_size=3)
    cache = str(tmp_path / "cache")
    first = Evaluator(settings, cache_root=cache, progress=False)
    r1 = first.evaluate(str(tiny_model_dir), suite, tmp_path / "run1" / "ocr", role="base")
    first.release()
    assert r1.stats["cache"] == "miss" and r1.stats["sampled"] == 6 and first.samplers_loaded == 1

    def no_model(*a, **k):
        raise AssertionError("a cache hit must not load the model")

    monkeypatch.setattr(Sampler, "load", classmethod(no_model))
    second = Evaluator(settings, cache_root=cache, progress=False)
    r2 = second.evaluate(str(tiny_model_dir), suite, tmp_path / "run2" / "ocr", role="base")
    assert r2.stats["cache"] == "hit" and r2.stats["sampled"] == 0 and second.samplers_loaded == 0
    assert r2.metrics == r1.metrics and [r["seed"] for r in r2.records] == [r["seed"] for r in r1.records]
    assert not (tmp_path / "run2" / "ocr").exists()  # nothing sampled or written for the hit
    # other settings: another key, a miss (which would need the model)
    with pytest.raises(AssertionError, match="must not load"):
        Evaluator(_settings(num_prompts=6, num_steps=5), cache_root=cache, progress=False).evaluate(
            str(tiny_model_dir), suite, tmp_path / "run3" / "ocr", role="base")


def test_pipeline_evaluate_step_logs_to_mlflow(tiny_model_dir, other_model_dir, tmp_path, monkeypatch, mlflow_uri):
    from flowgrpo.pipeline import steps
    from flowgrpo.tracking import _client, check_tracking

    monkeypatch.setenv("FLOWGRPO_HOME", str(tmp_path / "home"))
    uri = mlflow_uri
    exp = check_tracking(uri, "t")
    run_id = _client(uri).create_run(exp).info.run_id
    kw = dict(model_uri=str(tiny_model_dir), base_model_uri=str(other_model_dir), preset="tiny_cpu",
              overrides="eval.num_steps=2 eval.num_prompts=4 sample.resolution=32", tracking_uri=uri,
              champion_model_uri=str(other_model_dir), gate_min_improvement=-1.0)
    res = steps.evaluate(**kw, mlflow_run_id=run_id)
    assert set(res) >= {"passed", "candidate", "base", "champion", "gate", "gate_metric", "delta", "markdown", "html",
                        "seconds"}
    assert res["gate_metric"] == "preset/avg" and res["passed"] is True and "<table" in res["html"]
    assert res["champion"] == res["base"]  # the same model, read from the cache the second time
    assert res["cache"]["base"]["preset"] == "miss" and res["cache"]["champion"]["preset"] == "hit"
    assert not Path(res["work_dir"]).exists()  # the step's own work directory is cleaned up
    c = _client(uri)
    data = c.get_run(run_id).data
    assert data.metrics["eval/preset/avg"] == res["candidate"]["preset/avg"]
    assert "eval_base/preset/avg" in data.metrics and "eval_champion/preset/avg" in data.metrics
    arts = {a.path for a in c.list_artifacts(run_id, "eval")}
    assert {"eval/report.html", "eval/report.md", "eval/metrics.json", "eval/results"} <= arts
    results = {a.path for a in c.list_artifacts(run_id, "eval/results/candidate")}
    assert results == {"eval/results/candidate/preset.jsonl"}
    # a recurring run: the base comes from the cache
    again = steps.evaluate(**kw)
    assert again["cache"]["base"]["preset"] == "hit" and again["base"] == res["base"]


def test_cli_preset_suite_logs_to_mlflow(tiny_model_dir, tmp_path, monkeypatch, capsys, mlflow_uri):
    from flowgrpo.eval import cli
    from flowgrpo.tracking import _client

    monkeypatch.setenv("FLOWGRPO_HOME", str(tmp_path / "home"))
    uri = mlflow_uri
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--suite", "preset", "--preset", "tiny_cpu", "--num-prompts", "3",
            "--steps", "2", "--resolution", "32", "--threads", "1", "--out", str(out), "--mlflow", "--tracking-uri",
            uri, "--experiment", "eval-test", "--json", "eval.guidance_scale=3.0"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["metrics"]["candidate"]["preset/n"] == 3 and summary["gate"]["passed"] is None  # no base
    meta = json.loads((out / "candidate" / "preset" / "meta.json").read_text())
    assert meta["settings"]["guidance_scale"] == 3.0 and meta["settings"]["num_steps"] == 2  # override, flag
    c = _client(uri)
    run = c.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["eval.suites"] == "preset"
    assert run.data.metrics["eval/preset/avg"] == pytest.approx(summary["metrics"]["candidate"]["preset/avg"])
    assert {"eval/report.html", "eval/report.md", "eval/metrics.json"} <= {a.path for a in c.list_artifacts(
        run.info.run_id, "eval")}
    assert (out / "report.html").is_file() and (out / "candidate" / "preset" / "results.jsonl").is_file()
    # the same command again: the candidate comes from the cache (published at the first run)
    assert cli.main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["runs"]["candidate"]["preset"]["cache"] == "hit"
    assert again["metrics"] == summary["metrics"]
