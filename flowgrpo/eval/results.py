"""Per-image results of an evaluation and what they add up to.

An evaluation directory (one model, one suite) holds::

    meta.json        what the numbers depend on (model identity, suite fingerprint, sampling settings)
    results.jsonl    one JSON object per scored image, appended as batches are scored
    skipped.json     {reward: reason} of optional rewards that could not be used
    images/          one thumbnail per image (``p<prompt>_i<image>.jpg``), what the report shows

A ``results.jsonl`` line (a *record*)::

    {"prompt_index": 3, "image_index": 1, "seed": 1234, "prompt": "a photo of a cat", "category": "single_object",
     "scores": {"geneval": 1.0}, "avg": 1.0, "passed": true, "details": {"geneval": {"correct": true, ...}},
     "image": "images/p000003_i1.jpg", "time": 1760000000.0}

Every line is written with one ``write`` on a file opened for appending and the file is fsynced after each
batch, so a crash leaves whole lines (and at worst a torn last line, which :meth:`ResultsLog.load` drops and
truncates away). A re-run reads the records and samples only the (prompt, image) pairs that are missing.

Aggregation (:func:`suite_metrics`), per suite ``s``:

* ``s/<reward>`` and ``s/<reward>_std``: mean and (population) standard deviation over the images of every
  reward score; ``s/avg`` (and ``s/avg_std``): the same for the weighted sum; ``s/n``: images;
  ``s/n_prompts``: prompts.
* for suites judged per image (GenEval and shapes: the reward's details carry a boolean ``correct``) the GenEval
  benchmark numbers: ``s/<tag>`` = mean correctness over that tag's images, ``s/overall`` = the unweighted mean
  of the per-tag accuracies (:func:`flowgrpo.rewards.geneval.rules.aggregate`), likewise ``s/strict_<tag>`` and
  ``s/strict_overall`` from the exact-count verdict, and ``s/image_accuracy`` = correct images / images.
* for ``ocr``: ``s/accuracy`` = images whose text is rendered exactly (distance 0) / images.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
META_FILE = "meta.json"
SKIPPED_FILE = "skipped.json"
IMAGES_DIR = "images"


class ResultsError(RuntimeError):
    """A results file that cannot be read (a corrupt line that is not the last one)."""


def image_name(prompt_index: int, image_index: int, ext: str = "jpg") -> str:
    return f"{IMAGES_DIR}/p{prompt_index:06d}_i{image_index}.{ext}"


class ResultsLog:
    """Append-only JSONL of records (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self, repair: bool = True) -> list[dict[str, Any]]:
        """All complete records. A torn last line (no newline, or not JSON) is dropped and, with ``repair``,
        truncated from the file so that later appends start on a fresh line; a bad line elsewhere raises
        :class:`ResultsError`."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        records: list[dict[str, Any]] = []
        good_end = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            line = data[pos:] if nl < 0 else data[pos:nl]
            end = len(data) if nl < 0 else nl + 1
            try:
                if nl < 0:
                    raise ValueError("no newline")
                rec = json.loads(line) if line.strip() else None
            except ValueError:
                if end < len(data):
                    raise ResultsError(f"{self.path}: line {len(records) + 1} is not valid JSON") from None
                log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", self.path,
                            len(line))
                break
            if rec is not None:
                if not isinstance(rec, dict):
                    raise ResultsError(f"{self.path}: line {len(records) + 1} is not a JSON object")
                records.append(rec)
            good_end = end
            pos = end
        if repair and good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        return records

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append ``records`` (one ``write`` per line), then fsync. Returns the number written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        n = 0
        try:
            for rec in records:
                line = (json.dumps(rec, sort_keys=True, default=_json_default, allow_nan=False) + "\n").encode()
                written = os.write(fd, line)
                if written != len(line):  # a regular file only writes short when the disk is full
                    raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
                n += 1
            os.fsync(fd)
        finally:
            os.close(fd)
        return n


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def finite(x: Any) -> float | None:
    """``float(x)`` when finite, else None (JSON has no NaN; MLflow and KFP reject it)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def latest(records: Iterable[Mapping[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
    """(prompt_index, image_index) -> the last record of that image."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for r in records:
        out[(int(r["prompt_index"]), int(r["image_index"]))] = dict(r)
    return out


# ---------------------------------------------------------------------------------------------- verdicts


def verdict(scores: Mapping[str, float], details: Mapping[str, Mapping[str, Any]]) -> tuple[bool | None, bool | None]:
    """(passed, strict_passed) of one image: the GenEval-style ``correct`` / ``strict_correct`` of whichever
    reward reports them, else OCR's exact rendering (distance 0), else (None, None) (no pass/fail)."""
    for d in details.values():
        if isinstance(d, Mapping) and isinstance(d.get("correct"), (bool, np.bool_)):
            strict = d.get("strict_correct")
            return bool(d["correct"]), (bool(strict) if strict is not None else None)
    ocr = details.get("ocr")
    if isinstance(ocr, Mapping) and "distance" in ocr and ocr.get("target"):
        ok = int(ocr["distance"]) == 0
        return ok, ok
    return None, None


# ------------------------------------------------------------------------------------------- aggregation


def reward_stats(records: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, float]:
    """``<prefix>/<reward>`` mean and ``<prefix>/<reward>_std`` of every reward score, and of ``avg``."""
    cols: dict[str, list[float]] = {}
    for r in records:
        for k, v in (r.get("scores") or {}).items():
            fv = finite(v)
            if fv is not None:
                cols.setdefault(k, []).append(fv)
        fv = finite(r.get("avg"))
        if fv is not None:
            cols.setdefault("avg", []).append(fv)
    out: dict[str, float] = {}
    for k, vals in cols.items():
        out[f"{prefix}/{k}"] = float(np.mean(vals))
        out[f"{prefix}/{k}_std"] = float(np.std(vals))
    return out


def tag_accuracy(records: Sequence[Mapping[str, Any]], key: str = "passed") -> dict[str, float]:
    """GenEval's summary of the records carrying a boolean ``key``: ``{tag: accuracy over that tag's images,
    ..., "overall": mean of the per-tag accuracies}`` (the tag is the record's ``category``)."""
    from flowgrpo.rewards.geneval.rules import aggregate

    pairs = [(r.get("category") or "all", bool(r[key])) for r in records if isinstance(r.get(key), bool)]
    return aggregate(pairs) if pairs else {}


def suite_metrics(suite_name: str, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The suite's metrics from its records (module docstring); only finite numbers."""
    out = reward_stats(records, suite_name)
    out[f"{suite_name}/n"] = float(len(records))
    out[f"{suite_name}/n_prompts"] = float(len({int(r["prompt_index"]) for r in records}))
    judged = [r for r in records if isinstance(r.get("passed"), bool)]
    if judged:
        has_tags = any(isinstance((d or {}).get("correct"), bool) for r in judged
                       for d in (r.get("details") or {}).values())
        if has_tags:
            for tag, acc in tag_accuracy(judged, "passed").items():
                out[f"{suite_name}/{tag}"] = acc
            for tag, acc in tag_accuracy(judged, "strict_passed").items():
                out[f"{suite_name}/strict_{tag}"] = acc
            out[f"{suite_name}/image_accuracy"] = float(np.mean([r["passed"] for r in judged]))
        else:
            out[f"{suite_name}/accuracy"] = float(np.mean([r["passed"] for r in judged]))
    return {k: v for k, v in out.items() if finite(v) is not None}


__all__ = ["IMAGES_DIR", "META_FILE", "RESULTS_FILE", "ResultsError", "ResultsLog", "SKIPPED_FILE", "finite",
           "image_name", "latest", "reward_stats", "suite_metrics", "tag_accuracy", "verdict"]
