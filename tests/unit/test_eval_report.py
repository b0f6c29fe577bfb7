"""The evaluation report from synthetic results (no model): Markdown table, self-contained HTML with the metrics
table (candidate / base / champion and deltas) and per-category image grids with prompts, scores and pass/fail
marks. Checked by parsing (always) and by rendering it in headless Chromium (when one is installed)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowgrpo.eval.report import html_report, markdown_report
from flowgrpo.eval.results import suite_metrics
from flowgrpo.eval.runner import EvalSettings, SuiteResult
from flowgrpo.eval.testing import chromium_binary, parse_report, render_report

TAGS = ["counting", "position"]


def _result(root: Path, role: str, suite: str, passes: dict[tuple[int, int], bool | None], colour: int,
            skipped: dict[str, str] | None = None) -> SuiteResult:
    recs = []
    for (pi, ii), ok in sorted(passes.items()):
        rel = f"images/p{pi:06d}_i{ii}.jpg"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), (colour, 40 * pi % 255, 30 * ii), np.uint8)).save(root / rel)
        score = 1.0 if ok else 0.25
        recs.append({"prompt_index": pi, "image_index": ii, "prompt": f"prompt <{pi}> & more",
                     "category": TAGS[pi % 2] if ok is not None else "all", "scores": {"r": score}, "avg": score,
                     "passed": ok, "strict_passed": ok,
                     "details": {"r": {"correct": ok}} if ok is not None else {}, "image": rel})
    return SuiteResult(suite, suite_metrics(suite, recs), recs, root, 1.5, role=role, model=f"{role}-uri",
                       primary=f"{suite}/overall" if suite == "geneval" else f"{suite}/avg", skipped=skipped or {},
                       stats={"cache": "miss", "resumed": 0})


@pytest.fixture()
def results(tmp_path):
    # 4 prompts x 2 images; prompt 3: candidate passes where the base fails (a disagreement)
    cand = {(pi, ii): pi % 2 == 0 or pi == 3 for pi in range(4) for ii in range(2)}
    base = {(pi, ii): pi % 2 == 0 for pi in range(4) for ii in range(2)}
    champ = {(pi, ii): pi == 0 for pi in range(4) for ii in range(2)}
    plain = {(pi, 0): None for pi in range(3)}
    why = {"imagereward": "RewardUnavailableError: the 'image-reward' package is not installed"}
    return {
        "candidate": [_result(tmp_path / "c" / "geneval", "candidate", "geneval", cand, 200),
                      _result(tmp_path / "c" / "drawbench", "candidate", "drawbench", plain, 180, why)],
        "base": [_result(tmp_path / "b" / "geneval", "base", "geneval", base, 90),
                 _result(tmp_path / "b" / "drawbench", "base", "drawbench", plain, 60, why)],
        "champion": [_result(tmp_path / "h" / "geneval", "champion", "geneval", champ, 10)],
    }


def _page(results, **kw) -> str:
    return html_report(results["candidate"], results["base"], champion=results["champion"],
                       gate="geneval/overall: candidate − base = +0.25 ≥ 0", passed=True,
                       gate_metric="geneval/overall",
                       models={"candidate": "s3://b/cand", "base": "s3://b/base", "champion": "s3://b/champ"},
                       settings=EvalSettings(num_steps=40, guidance_scale=4.5), **kw)


def test_markdown_table_with_base_and_champion():
    cm = {"geneval/overall": 0.75, "geneval/n": 8.0}
    md = markdown_report(cm, {"geneval/overall": 0.5}, champion={"geneval/overall": 0.25}, gate="g", passed=False,
                         gate_metric="geneval/overall", skipped={"drawbench": {"deqa": "not available"}})
    assert "| metric | candidate | base | Δ base | champion | Δ champion |" in md
    assert "| **geneval/overall** | 0.75 | 0.5 | 0.25 | 0.25 | 0.5 |" in md
    assert "| geneval/n | 8 | – | – | – | – |" in md
    assert "**FAILED**" in md and "`deqa` skipped: not available" in md
    assert "**n/a**" in markdown_report(cm, {}, gate="g", passed=None)


def test_html_report_structure(results, tmp_path):
    page = _page(results)
    facts = parse_report(page)
    assert facts["external"] == []  # self-contained
    assert facts["verdict"] == "PASSED" and facts["title"] == "Flow-GRPO evaluation"
    header, *rows = facts["metrics_rows"]
    assert header == ["metric", "candidate", "base", "Δ base", "champion", "Δ champion"]
    by_name = {r[0]: r for r in rows}
    # per-tag accuracies: candidate counting (prompts 0, 2) 1.0, position (1, 3) 0.5; base 1.0 / 0.0
    assert by_name["geneval/position"][1:] == ["0.5", "0", "0.5", "0", "0.5"]
    assert by_name["geneval/overall"][1:4] == ["0.75", "0.5", "0.25"]
    table = page.split('<table id="metrics">')[1]
    assert "class='gate'" in table.split("geneval/overall</td>")[0].rsplit("<tr", 1)[1]  # the gate row is marked
    summary = page.split('<table id="summary">')[1].split("</table>")[0]
    assert summary.count("<tr>") == 3  # header + one row per suite
    assert "<td>geneval/overall</td><td class=''>0.75</td><td class=''>0.5</td><td class='up'>0.25</td>" in summary
    assert facts["suites"] == ["geneval", "drawbench"]
    assert facts["categories"] == {"geneval": ["counting", "position"], "drawbench": ["all"]}
    gcards = [c for c in facts["cards"] if c["suite"] == "geneval"]
    assert len(gcards) == 4 and all(set(c["roles"]) == {"candidate", "base", "champion"} for c in gcards)
    # within "position", the prompt where candidate and base disagree (3) comes first
    assert [c["prompt_index"] for c in gcards] == [0, 2, 3, 1]
    assert gcards[0]["prompt"] == "prompt <0> & more"  # escaped in HTML, intact as text
    figs = [f for f in facts["figures"] if f["suite"] == "geneval"]
    assert len(figs) == 4 * 2 * 3
    c3 = gcards[2]["roles"]
    assert [f["class"] for f in c3["candidate"]] == ["pass", "pass"] and c3["candidate"][0]["caption"] == "1 ✓"
    assert [f["class"] for f in c3["base"]] == ["fail", "fail"] and c3["base"][0]["caption"] == "0.25 ✗"
    # drawbench: no verdicts -> neutral figures, score only; skipped reward listed with its reason
    dfigs = [f for f in facts["figures"] if f["suite"] == "drawbench"]
    assert len(dfigs) == 6 and {f["class"] for f in dfigs} == {"none"} and dfigs[0]["caption"] == "0.25"
    assert "reward <b>imagereward</b> skipped: RewardUnavailableError" in page
    # thumbnails: inline JPEG data URIs, resized to the thumbnail size
    for f in facts["figures"]:
        assert f["img"].startswith("data:image/jpeg;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(figs[0]["img"].split(",", 1)[1])))
    assert im.format == "JPEG" and max(im.size) == 64  # stored 64 px, below the 128 px thumbnail: kept
    small = parse_report(_page(results, thumb_px=32, max_prompts_per_category=1, max_images_per_prompt=1))
    im = Image.open(io.BytesIO(base64.b64decode(small["figures"][0]["img"].split(",", 1)[1])))
    assert max(im.size) == 32
    assert len([c for c in small["cards"] if c["suite"] == "geneval"]) == 2  # one per category
    assert all(len(figs) == 1 for c in small["cards"] for figs in c["roles"].values())


def test_html_report_renders_in_headless_chromium(results, tmp_path):
    page = _page(results)
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    n_imgs = len(parse_report(page)["figures"])
    if chromium_binary() is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium); the parse-based checks above ran")
    shot = tmp_path / "report.png"
    facts = render_report(path, screenshot=shot)
    assert facts["dom_has_metrics_table"]
    assert facts["images"] == n_imgs and facts["images_ok"] == n_imgs  # every thumbnail decoded
    assert facts["table_rows"] == len(parse_report(page)["metrics_rows"]) and facts["table_height"] > 50
    assert facts["grids"] == 3 and facts["grids_visible"] == 3
    png = Image.open(shot)
    assert png.size == (1400, 2000)
    assert len(set(np.asarray(png.convert("L")).ravel().tolist())) > 10  # not a blank page


def test_video_clips_are_embedded_as_animated_gifs(tmp_path):
    """Evaluation stores a video sample as a GIF (flowgrpo.eval.runner.encode_image); the report embeds it as is."""
    from flowgrpo.eval.runner import encode_image

    clip = np.stack([np.full((32, 32, 3), 40 * f, np.uint8) for f in range(5)])  # [F, H, W, 3]
    data, ext = encode_image(clip, thumb_size=256)
    assert ext == "gif" and Image.open(io.BytesIO(data)).n_frames == 5
    root = tmp_path / "wan"
    (root / "images").mkdir(parents=True)
    (root / "images" / "p000000_i0.gif").write_bytes(data)
    rec = {"prompt_index": 0, "image_index": 0, "prompt": "a cat running", "category": "all", "scores": {"r": 0.5},
           "avg": 0.5, "passed": None, "strict_passed": None, "details": {}, "image": "images/p000000_i0.gif"}
    res = SuiteResult("preset", suite_metrics("preset", [rec]), [rec], root, 1.0, role="candidate", model="m",
                      primary="preset/avg", skipped={}, stats={})
    page = html_report([res], [], gate="", passed=None, models={"candidate": "m"}, settings=EvalSettings())
    uri = "data:image/gif;base64," + base64.b64encode(data).decode("ascii")
    assert uri in page
