"""Tiny, randomly initialised reward models for offline evaluation runs (tests, benchmarks, demos).

:func:`tiny_reward_options` writes a tiny CLIP (PickScore / CLIPScore / aesthetic / GenEval colours), a random
aesthetic head and a tiny Mask2Former COCO instance detector into a directory and returns the
``reward_options`` that make every suite's rewards load them instead of the real checkpoints::

    opts = tiny_reward_options(tmp / "rewards")
    suite = build_suite("drawbench", data_root=..., reward_options=opts)

The detector's class head is biased toward a few COCO classes so that it reports confident (random) objects:
GenEval verdicts and detections then take both values, which is what report and aggregation code needs to see.
``unifiedreward`` points at a closed local port (it is skipped with the connection error, like a missing
endpoint in production); ``ocr`` is the real RapidOCR engine (it ships its models).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: COCO classes the tiny detector favours (index into COCO_CLASSES: person, dog, cat)
FAVOURED = {"person": 6.0, "dog": 5.0, "cat": 4.0}
TINY_DETECTOR_SIZE = {"shortest_edge": 64, "longest_edge": 64}


def make_tiny_mask2former(out_dir: str | os.PathLike, seed: int = 0,
                          favoured: dict[str, float] | None = None) -> Path:
    """Save a tiny random ``Mask2FormerForUniversalSegmentation`` (Swin backbone, 8 queries, the 80 COCO labels)
    and its image processor (64 px) to ``out_dir``; class logits get ``favoured`` biases."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    from flowgrpo.rewards.geneval.detector import COCO_CLASSES, _pil_processor_class

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    labels = dict(enumerate(COCO_CLASSES))
    cfg = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=32, num_queries=8, id2label=labels,
                            label2id={v: k for k, v in labels.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        head = model.class_predictor
        for name, bias in (FAVOURED if favoured is None else favoured).items():
            head.bias[COCO_CLASSES.index(name)] += float(bias)
    model.save_pretrained(out)
    _pil_processor_class("Mask2FormerImageProcessorPil", "Mask2FormerImageProcessor")(
        size=dict(TINY_DETECTOR_SIZE)).save_pretrained(out)
    return out


def tiny_reward_options(root: str | os.PathLike, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Build (once per ``root``) the tiny reward models; return {reward: options} for every suite's rewards."""
    from flowgrpo.rewards.testing import make_tiny_clip, save_aesthetic_head, tiny_clip_projection_dim

    root = Path(root)
    clip, head, det = root / "clip", root / "aesthetic_head.safetensors", root / "mask2former"
    marker = root / "flowgrpo_tiny_rewards.json"
    if not marker.is_file():
        make_tiny_clip(clip, seed=seed)
        save_aesthetic_head(head, input_dim=tiny_clip_projection_dim(clip), seed=seed)
        make_tiny_mask2former(det, seed=seed)
        marker.write_text(json.dumps({"seed": seed}) + "\n")
    c = str(clip)
    return {
        "pickscore": {"model": c, "processor": c, "device": "cpu"},
        "clipscore": {"model": c, "device": "cpu"},
        "aesthetic": {"model": c, "head_path": str(head), "device": "cpu"},
        "geneval": {"model": str(det), "color_model": c, "device": "cpu", "lazy_color": True,
                    "detector_options": {"size": dict(TINY_DETECTOR_SIZE)}},
        "unifiedreward": {"base_url": "http://127.0.0.1:9/v1", "retries": 0, "timeout": 2.0},
        "ocr": {"device": "cpu"},
    }




# --------------------------------------------------------------------------------------- report checks


def parse_report(page: str) -> dict[str, Any]:
    """Facts about an HTML report, read with the standard library's ``html.parser`` (no browser): the metrics
    table's rows (lists of cell texts), the suites, the categories per suite, the prompt cards and the figures
    (role, pass/fail class, caption, whether the image is an inline ``data:`` URI), plus external references
    (``src``/``href`` that are neither ``data:`` URIs nor in-page anchors: a self-contained report has none)."""
    from html.parser import HTMLParser

    class P(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.out: dict[str, Any] = {"metrics_rows": [], "suites": [], "categories": {}, "cards": [],
                                        "figures": [], "external": [], "verdict": None, "title": ""}
            self.stack: list[tuple[str, dict]] = []
            self.table = None
            self.row: list[str] | None = None
            self.cell: list[str] | None = None
            self.suite = None
            self.card = None
            self.role = None
            self.figure = None
            self.text_sink: list[str] | None = None
            self.in_title = False
            self.in_verdict = False

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            for k in ("src", "href"):
                v = a.get(k)
                if v and not v.startswith(("data:", "#")):
                    self.out["external"].append(v)
            if tag == "title":
                self.in_title = True
            if tag == "table":
                self.table = a.get("id")
            if tag == "tr" and self.table == "metrics":
                self.row = []
            if tag in ("td", "th") and self.row is not None:
                self.cell = []
            if tag == "section" and "suite" in (a.get("class") or ""):
                self.suite = (a.get("id") or "").removeprefix("suite-")
                self.out["suites"].append(self.suite)
                self.out["categories"][self.suite] = []
            if tag == "div" and a.get("class") == "grid" and self.suite is not None:
                self.out["categories"][self.suite].append(a.get("data-category"))
            if tag == "div" and a.get("class") == "card":
                self.card = {"suite": self.suite, "prompt_index": int(a.get("data-prompt-index", -1)),
                             "prompt": "", "roles": {}}
                self.out["cards"].append(self.card)
            if tag == "p" and a.get("class") == "prompt" and self.card is not None:
                self.text_sink = []
            if tag == "div" and a.get("class") == "row":
                self.role = a.get("data-role")
                if self.card is not None:
                    self.card["roles"][self.role] = []
            if tag == "figure":
                self.figure = {"suite": self.suite, "role": self.role, "class": a.get("class"), "caption": "",
                               "img": None, "passed": a.get("data-passed")}
                self.out["figures"].append(self.figure)
                if self.card is not None and self.role in self.card["roles"]:
                    self.card["roles"][self.role].append(self.figure)
            if tag == "img" and self.figure is not None:
                self.figure["img"] = a.get("src", "")
            if tag == "figcaption" and self.figure is not None:
                self.text_sink = []
            if tag == "span" and a.get("id") == "verdict":
                self.in_verdict = True

        def handle_endtag(self, tag):
            if tag == "title":
                self.in_title = False
            if tag in ("td", "th") and self.cell is not None and self.row is not None:
                self.row.append("".join(self.cell).strip())
                self.cell = None
            if tag == "tr" and self.row is not None:
                self.out["metrics_rows"].append(self.row)
                self.row = None
            if tag == "table":
                self.table = None
            if tag == "p" and self.text_sink is not None and self.card is not None and self.figure is None:
                self.card["prompt"] = "".join(self.text_sink)
                self.text_sink = None
            if tag == "figcaption" and self.text_sink is not None and self.figure is not None:
                self.figure["caption"] = "".join(self.text_sink).strip()
                self.text_sink = None
            if tag == "figure":
                self.figure = None
            if tag == "section":
                self.suite = None
            if tag == "span":
                self.in_verdict = False

        def handle_data(self, data):
            if self.in_title:
                self.out["title"] += data
            if self.cell is not None:
                self.cell.append(data)
            if self.text_sink is not None:
                self.text_sink.append(data)
            if self.in_verdict:
                self.out["verdict"] = (self.out["verdict"] or "") + data

    p = P()
    p.feed(page)
    p.close()
    return p.out


def chromium_binary() -> str | None:
    """A headless-capable Chromium/Chrome on PATH (``$FLOWGRPO_CHROMIUM`` first), or None."""
    import shutil

    for name in (os.environ.get("FLOWGRPO_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var table = document.getElementById('metrics');
  var grids = document.querySelectorAll('.grid');
  var visible = Array.prototype.filter.call(grids, function (g) { var r = g.getBoundingClientRect();
                                                                  return r.width > 0 && r.height > 0; });
  var b = document.body;
  b.setAttribute('data-probe-images', imgs.length);
  b.setAttribute('data-probe-images-ok', ok.length);
  b.setAttribute('data-probe-table-rows', table ? table.rows.length : -1);
  b.setAttribute('data-probe-table-height', table ? Math.round(table.getBoundingClientRect().height) : -1);
  b.setAttribute('data-probe-grids', grids.length);
  b.setAttribute('data-probe-grids-visible', visible.length);
});
</script>"""


def render_report(path: str | os.PathLike, screenshot: str | os.PathLike | None = None,
                  chromium: str | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Open the report in headless Chromium (``--dump-dom``, on a copy with a probe script) and return what the
    browser laid out: images / images decoded, metrics table rows and height, grids / visible grids; with
    ``screenshot`` also save a PNG of the page. Raises RuntimeError when no browser is available."""
    import re
    import subprocess
    import tempfile

    exe = chromium or chromium_binary()
    if exe is None:
        raise RuntimeError("no chromium binary found")
    page = Path(path).read_text(encoding="utf-8")
    flags = ["--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--virtual-time-budget=10000"]
    with tempfile.TemporaryDirectory(prefix="flowgrpo-report-") as d:
        probe = Path(d) / "probe.html"
        probe.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
        env = {**os.environ, "HOME": d}  # chromium writes its profile under $HOME
        r = subprocess.run([exe, *flags, f"--user-data-dir={d}/profile", "--dump-dom", probe.as_uri()],
                           capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"chromium failed ({r.returncode}): {r.stderr[-2000:]}")
        dom = r.stdout
        if screenshot is not None:
            s = subprocess.run([exe, *flags, f"--user-data-dir={d}/profile2", "--window-size=1400,2000",
                                f"--screenshot={Path(screenshot).resolve()}", Path(path).resolve().as_uri()],
                               capture_output=True, text=True, timeout=timeout, env=env)
            if s.returncode != 0:
                raise RuntimeError(f"chromium screenshot failed ({s.returncode}): {s.stderr[-2000:]}")
    m = re.search(r"<body([^>]*)>", dom)
    attrs = dict(re.findall(r'data-probe-([a-z-]+)="(-?\d+)"', m.group(1) if m else ""))
    facts = {k.replace("-", "_"): int(v) for k, v in attrs.items()}
    facts["dom_has_metrics_table"] = 'id="metrics"' in dom
    facts["dom_bytes"] = len(dom)
    return facts


__all__ = ["FAVOURED", "chromium_binary", "make_tiny_mask2former", "parse_report", "render_report",
           "tiny_reward_options"]
