"""What a person reads after an evaluation: a metrics table (candidate vs base, delta) as Markdown, and the
same table plus each suite's image grids side by side as a self-contained HTML page (images inlined)."""

from __future__ import annotations

import base64
import html
import io
import math

from flowgrpo.eval.runner import SuiteResult


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.5g}"


def comparison_rows(candidate: dict[str, float], base: dict[str, float]) -> list[tuple[str, float, float | None, float | None]]:
    """(metric, candidate, base, candidate - base) for every candidate metric, sorted by name."""
    rows = []
    for k in sorted(candidate):
        b = base.get(k)
        rows.append((k, candidate[k], b, None if b is None else candidate[k] - b))
    return rows


def markdown_report(candidate: dict[str, float], base: dict[str, float], *, gate: str, passed: bool,
                    title: str = "Flow-GRPO evaluation") -> str:
    lines = [f"# {title}", "", f"**Gate:** {gate} → **{'PASSED' if passed else 'FAILED'}**", "",
             "| metric | candidate | base | Δ |", "|---|---:|---:|---:|"]
    for k, c, b, d in comparison_rows(candidate, base):
        lines.append(f"| {k} | {_fmt(c)} | {_fmt(b)} | {_fmt(d)} |")
    return "\n".join(lines) + "\n"


def _grid_png(result: SuiteResult) -> str:
    from flowgrpo.metrics import image_grid

    if not len(result.images):
        return ""
    buf = io.BytesIO()
    image_grid(result.images, result.captions).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def html_report(candidate: list[SuiteResult], base: list[SuiteResult], *, gate: str, passed: bool,
                title: str = "Flow-GRPO evaluation") -> str:
    cm = {k: v for r in candidate for k, v in r.metrics.items()}
    bm = {k: v for r in base for k, v in r.metrics.items()}
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{_fmt(c)}</td><td>{_fmt(b)}</td>"
        f"<td class='{'up' if (d or 0) > 0 else 'down' if (d or 0) < 0 else ''}'>{_fmt(d)}</td></tr>"
        for k, c, b, d in comparison_rows(cm, bm))
    sections = []
    by_suite = {r.suite: r for r in base}
    for r in candidate:
        cells = [f"<figure><figcaption>candidate</figcaption><img alt='candidate {esc(r.suite)}' "
                 f"src='data:image/png;base64,{_grid_png(r)}'></figure>"]
        if r.suite in by_suite:
            cells.append(f"<figure><figcaption>base</figcaption><img alt='base {esc(r.suite)}' "
                         f"src='data:image/png;base64,{_grid_png(by_suite[r.suite])}'></figure>")
        sections.append(f"<h2>{esc(r.suite)}</h2><div class='grids'>{''.join(cells)}</div>")
    verdict = "PASSED" if passed else "FAILED"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}}
.up{{color:#080}} .down{{color:#a00}} .grids{{display:flex;gap:1em;flex-wrap:wrap}} img{{max-width:100%}}</style>
</head><body><h1>{esc(title)}</h1>
<p><b>Gate:</b> {esc(gate)} &rarr; <b class="{'up' if passed else 'down'}">{verdict}</b></p>
<table id="metrics"><tr><th>metric</th><th>candidate</th><th>base</th><th>&Delta;</th></tr>{rows}</table>
{''.join(sections)}
</body></html>
"""
