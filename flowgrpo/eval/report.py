"""What a person reads after an evaluation.

* :func:`markdown_report`: the gate verdict and a metrics table (candidate, base, Δ, champion, Δ) as Markdown.
* :func:`html_report`: one self-contained HTML page (no external resources; thumbnails inlined as JPEG data
  URIs, so it works as a KFP HTML artifact and as an MLflow artifact): the verdict, the models and settings, a
  summary table (``<table id="summary">``: each suite's primary metric), the table of all metrics
  (``<table id="metrics">``), then per suite its skipped rewards and, per category (GenEval tag,
  else one "all" category), a grid of prompt cards: the prompt and, per model, its images with their score and a
  pass/fail mark (GenEval correctness, OCR exact match; no mark where the suite has no verdict). Prompts where
  the candidate and the base disagree come first.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import OrderedDict
from typing import Any, Sequence

from flowgrpo.eval.runner import EvalSettings, SuiteResult
from flowgrpo.rewards.geneval.rules import TAGS

ROLE_LABELS = {"candidate": "candidate", "base": "base", "champion": "champion"}


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.5g}"


def _delta(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return a - b


def comparison_rows(candidate: dict[str, float], base: dict[str, float],
                    champion: dict[str, float] | None = None) -> list[tuple]:
    """(metric, candidate, base, candidate - base[, champion, candidate - champion]) for every candidate metric,
    sorted by name (``*_std`` and counts after their means)."""
    rows = []
    for k in sorted(candidate, key=_metric_order):
        c, b = candidate[k], base.get(k)
        row: tuple = (k, c, b, _delta(c, b))
        if champion is not None:
            h = champion.get(k)
            row += (h, _delta(c, h))
        rows.append(row)
    return rows


def _metric_order(name: str) -> tuple:
    """Per suite: the summary (overall / avg) first, then the other metrics, standard deviations, counts."""
    suite, _, rest = name.partition("/")
    rank = (0 if rest in ("overall", "avg") else 3 if rest in ("n", "n_prompts") else 2 if rest.endswith("_std")
            else 1)
    return (suite, rank, rest)


def markdown_report(candidate: dict[str, float], base: dict[str, float], *, gate: str, passed: bool | None,
                    title: str = "Flow-GRPO evaluation", champion: dict[str, float] | None = None,
                    gate_metric: str = "", skipped: dict[str, dict[str, str]] | None = None) -> str:
    verdict = "PASSED" if passed else "n/a" if passed is None else "FAILED"
    lines = [f"# {title}", "", f"**Gate:** {gate} → **{verdict}**", ""]
    head = "| metric | candidate | base | Δ base |"
    sep = "|---|---:|---:|---:|"
    if champion is not None:
        head += " champion | Δ champion |"
        sep += "---:|---:|"
    lines += [head, sep]
    for row in comparison_rows(candidate, base, champion):
        name = f"**{row[0]}**" if row[0] == gate_metric else row[0]
        lines.append("| " + " | ".join([name] + [_fmt(v) for v in row[1:]]) + " |")
    for suite, reasons in (skipped or {}).items():
        for name, why in reasons.items():
            lines.append("")
            lines.append(f"- {suite}: reward `{name}` skipped: {why}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{margin:.9em 0 .4em;font-size:1.05em}
table{border-collapse:collapse;font-size:.92em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child,th:first-child{text-align:left}
#models td,#models th{text-align:left} #summary td:nth-child(2){text-align:left}
th{background:#f3f3f3} tr.gate td{background:#fff7d6;font-weight:600}
.up{color:#08702a} .down{color:#b00020} .muted{color:#777;font-size:.9em}
.verdict{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:700}
.verdict.pass{background:#08702a} .verdict.fail{background:#b00020} .verdict.na{background:#777}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px 8px;background:#fafafa;max-width:100%}
.card .prompt{font-size:.85em;margin:0 0 4px;max-width:560px;overflow-wrap:anywhere}
.row{display:flex;align-items:flex-start;gap:4px;margin:2px 0}
.row .who{font-size:.75em;color:#555;width:70px;flex:none;padding-top:4px}
figure{margin:0;border:3px solid #bbb;border-radius:3px;background:#fff;text-align:center}
figure.pass{border-color:#2e9e4f} figure.fail{border-color:#d0343f}
figure img{display:block;width:__THUMB__px;height:__THUMB__px;object-fit:contain;image-rendering:auto}
figcaption{font-size:.72em;line-height:1.25;padding:1px 2px;white-space:nowrap}
.noimg{width:__THUMB__px;height:__THUMB__px;display:flex;align-items:center;justify-content:center;color:#999;
font-size:.7em}
ul.skipped{color:#8a5a00;font-size:.9em}
"""


def _thumb_uri(res: SuiteResult, record: dict[str, Any], px: int, cache: dict) -> str | None:
    path = res.image_path(record)
    if path is None:
        return None
    key = (str(path), px)
    if key not in cache and path.suffix == ".gif":  # a video clip: the stored thumbnail GIF itself, animated
        cache[key] = "data:image/gif;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    if key not in cache:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            if max(im.size) > px:
                im.thumbnail((px, px), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
        cache[key] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return cache[key]


def _by_prompt(res: SuiteResult | None) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = OrderedDict()
    if res is None:
        return out
    for r in res.records:
        out.setdefault(int(r["prompt_index"]), []).append(r)
    return out


def _prompt_pass(recs: list[dict[str, Any]]) -> float | None:
    vals = [bool(r["passed"]) for r in recs if isinstance(r.get("passed"), bool)]
    return sum(vals) / len(vals) if vals else None


def _prompt_score(recs: list[dict[str, Any]]) -> float | None:
    vals = [r["avg"] for r in recs if isinstance(r.get("avg"), (int, float))]
    return sum(vals) / len(vals) if vals else None


def _figure(res: SuiteResult, rec: dict[str, Any], px: int, cache: dict, esc) -> str:
    passed = rec.get("passed")
    cls = "pass" if passed is True else "fail" if passed is False else "none"
    mark = " ✓" if passed is True else " ✗" if passed is False else ""
    score = rec.get("avg")
    if score is None:
        vals = [v for v in (rec.get("scores") or {}).values() if isinstance(v, (int, float))]
        score = vals[0] if vals else None
    uri = _thumb_uri(res, rec, px, cache)
    alt = f"{res.role} image {rec['image_index']} of prompt {rec['prompt_index']}"
    body = (f"<img alt='{esc(alt)}' src='{uri}'>" if uri else "<div class='noimg'>no image</div>")
    title = esc("; ".join(f"{k}={_fmt(v)}" for k, v in (rec.get("scores") or {}).items()))
    return (f"<figure class='{cls}' title='{title}' data-passed='{esc(str(passed).lower())}'>{body}"
            f"<figcaption>{_fmt(score)}{mark}</figcaption></figure>")


def _suite_section(cand: SuiteResult, others: dict[str, SuiteResult], *, max_prompts: int, max_images: int,
                   px: int, cache: dict) -> str:
    esc = html.escape
    by_role = {"candidate": _by_prompt(cand), **{role: _by_prompt(r) for role, r in others.items()}}
    base_by = by_role.get("base", {})
    found: dict[str, list[int]] = OrderedDict()
    for pi, recs in by_role["candidate"].items():
        found.setdefault(str(recs[0].get("category") or "all"), []).append(pi)
    # GenEval tags in the benchmark's order, anything else after them in order of appearance
    order = [t for t in TAGS if t in found] + [c for c in found if c not in TAGS]
    categories = OrderedDict((c, found[c]) for c in order)
    parts = [f"<section class='suite' id='suite-{esc(cand.suite)}'><h2>{esc(cand.suite)}</h2>"]
    n_img = len(cand.records)
    parts.append(f"<p class='muted'>{n_img} images of {len(by_role['candidate'])} prompts · primary metric "
                 f"<b>{esc(cand.primary)}</b> = {_fmt(cand.metrics.get(cand.primary))}"
                 + "".join(f" · {esc(role)} {_fmt(r.metrics.get(cand.primary))}" for role, r in others.items())
                 + "</p>")
    skipped = dict(cand.skipped)
    for r in others.values():
        for k, v in r.skipped.items():
            skipped.setdefault(k, v)
    if skipped:
        parts.append("<ul class='skipped'>" + "".join(
            f"<li>reward <b>{esc(k)}</b> skipped: {esc(v)}</li>" for k, v in skipped.items()) + "</ul>")
    for cat, pis in categories.items():
        def disagreement(pi: int) -> tuple:
            a, b = _prompt_pass(by_role["candidate"][pi]), _prompt_pass(base_by.get(pi, []))
            if a is None or b is None:
                sa, sb = _prompt_score(by_role["candidate"][pi]), _prompt_score(base_by.get(pi, []))
                return (0 if (sa is not None and sb is not None and abs(sa - sb) > 1e-12) else 1, pi)
            return (0 if a != b else 1, pi)

        shown = sorted(pis, key=disagreement)[:max_prompts] if base_by else pis[:max_prompts]
        metric = cand.metrics.get(f"{cand.suite}/{cat}")
        acc = "" if metric is None else f" — candidate {_fmt(metric)}" + "".join(
            f" · {esc(role)} {_fmt(r.metrics.get(f'{cand.suite}/{cat}'))}" for role, r in others.items())
        parts.append(f"<h3 class='category'>{esc(cat)}{acc} <span class='muted'>({len(shown)} of {len(pis)} "
                     f"prompts)</span></h3><div class='grid' data-category='{esc(cat)}'>")
        for pi in shown:
            prompt = by_role["candidate"][pi][0].get("prompt", "")
            rows = []
            for role, recs_by in by_role.items():
                recs = recs_by.get(pi, [])[:max_images]
                res = cand if role == "candidate" else others[role]
                figs = "".join(_figure(res, r, px, cache, esc) for r in recs) or "<span class='muted'>–</span>"
                rows.append(f"<div class='row' data-role='{esc(role)}'><span class='who'>{esc(role)}</span>"
                            f"{figs}</div>")
            parts.append(f"<div class='card' data-prompt-index='{pi}'><p class='prompt'>{esc(prompt)}</p>"
                         + "".join(rows) + "</div>")
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def html_report(candidate: Sequence[SuiteResult], base: Sequence[SuiteResult], *, gate: str, passed: bool | None,
                title: str = "Flow-GRPO evaluation", champion: Sequence[SuiteResult] | None = None,
                gate_metric: str = "", models: dict[str, str] | None = None, settings: EvalSettings | None = None,
                max_prompts_per_category: int = 6, max_images_per_prompt: int = 4, thumb_px: int = 128) -> str:
    """The self-contained HTML report (module docstring)."""
    esc = html.escape
    cm = {k: v for r in candidate for k, v in r.metrics.items()}
    bm = {k: v for r in base for k, v in r.metrics.items()}
    hm = {k: v for r in champion for k, v in r.metrics.items()} if champion else None
    head = "<tr><th>metric</th><th>candidate</th><th>base</th><th>&Delta; base</th>"
    if hm is not None:
        head += "<th>champion</th><th>&Delta; champion</th>"
    head += "</tr>"

    def cell(v: float | None, delta: bool = False) -> str:
        cls = ("up" if (v or 0) > 0 else "down" if (v or 0) < 0 else "") if delta else ""
        return f"<td class='{cls}'>{_fmt(v)}</td>"

    body = []
    for row in comparison_rows(cm, bm, hm):
        cls = " class='gate'" if row[0] == gate_metric else ""
        cells = [cell(row[1]), cell(row[2]), cell(row[3], True)]
        if hm is not None:
            cells += [cell(row[4]), cell(row[5], True)]
        body.append(f"<tr{cls}><td>{esc(row[0])}</td>{''.join(cells)}</tr>")
    summary = []
    for r in candidate:
        p = r.primary
        b = next((x.metrics.get(p) for x in base if x.suite == r.suite), None)
        h = next((x.metrics.get(p) for x in (champion or []) if x.suite == r.suite), None)
        c = r.metrics.get(p)
        cells = [cell(c), cell(b), cell(_delta(c, b), True)]
        if hm is not None:
            cells += [cell(h), cell(_delta(c, h), True)]
        summary.append(f"<tr><td><a href='#suite-{esc(r.suite)}'>{esc(r.suite)}</a></td><td>{esc(p)}</td>"
                       f"{''.join(cells)}<td>{len(r.records)}</td></tr>")
    summary_head = head.replace("<th>metric</th>", "<th>suite</th><th>primary metric</th>").replace(
        "</tr>", "<th>images</th></tr>")
    verdict, vcls = ("PASSED", "pass") if passed else ("n/a", "na") if passed is None else ("FAILED", "fail")
    model_rows = ""
    if models:
        all_res = {"candidate": list(candidate), "base": list(base), "champion": list(champion or [])}
        for role, uri in models.items():
            runs = all_res.get(role, [])
            how = ", ".join(f"{r.suite}: {r.stats.get('cache', '?')}"
                            + (f" ({r.stats.get('resumed')} resumed)" if r.stats.get("resumed") and
                               r.stats.get("cache") != "hit" else "") for r in runs)
            secs = sum(r.seconds for r in runs)
            model_rows += (f"<tr><td>{esc(role)}</td><td style='text-align:left'>{esc(uri)}</td>"
                           f"<td style='text-align:left'>{esc(how)}</td><td>{secs:.1f}</td></tr>")
        model_rows = ("<table id='models'><tr><th>model</th><th>URI</th><th>suites (cache)</th><th>s</th></tr>"
                      + model_rows + "</table>")
    setting_text = ""
    if settings is not None:
        setting_text = (f"<p class='muted'>ODE sampling: {settings.num_steps} steps, CFG {settings.guidance_scale:g}, "
                        f"{settings.resolution}px, seed {settings.seed}, batch {settings.batch_size}</p>")
    others_by_suite: dict[str, dict[str, SuiteResult]] = {}
    for role, rs in (("base", base), ("champion", champion or [])):
        for r in rs:
            others_by_suite.setdefault(r.suite, {})[role] = r
    cache: dict = {}
    sections = [_suite_section(r, others_by_suite.get(r.suite, {}), max_prompts=max_prompts_per_category,
                               max_images=max_images_per_prompt, px=thumb_px, cache=cache) for r in candidate]
    css = _CSS.replace("__THUMB__", str(int(thumb_px)))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{css}</style></head><body>
<h1>{esc(title)}</h1>
<p><b>Gate:</b> {esc(gate)} <span class="verdict {vcls}" id="verdict">{verdict}</span></p>
{model_rows}{setting_text}
<h2>Summary</h2>
<table id="summary">{summary_head}{''.join(summary)}</table>
<h2>All metrics</h2>
<table id="metrics">{head}{''.join(body)}</table>
{''.join(sections)}
</body></html>
"""


__all__ = ["comparison_rows", "html_report", "markdown_report"]
