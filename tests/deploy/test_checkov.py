"""checkov on the Dockerfiles and on the rendered overlays: no failed check; every skipped check is listed
with its reason in .checkov.yaml.

checkov cannot share .venv: it pins boto3 / botocore / packaging below what kfp and mlflow need, so it lives in
its own venv, .cache/checkov-venv (``make checkov-venv``, from images/Makefile.images). Without it this test
skips and says how to create it."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOYABLE, IMAGES, ROOT, rendered_text

CHECKOV = ROOT / ".cache" / "checkov-venv" / "bin" / "checkov"
CONFIG = ROOT / ".checkov.yaml"
#: extra skips for the run templates only (documented in .checkov.yaml)
TEMPLATE_ONLY_SKIPS = ["CKV_K8S_40"]

pytestmark = pytest.mark.skipif(
    not CHECKOV.exists(),
    reason="checkov is not installed in .cache/checkov-venv (it conflicts with kfp's pins in .venv): "
           "`python3 -m venv .cache/checkov-venv && .cache/checkov-venv/bin/pip install checkov==3.3.30` "
           "(or `make checkov-venv`)")


def _config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def _run(directory: Path, framework: str, skips: list[str] | None = None) -> list[dict[str, Any]]:
    cmd = [str(CHECKOV), "--config-file", str(CONFIG), "-d", str(directory), "--framework", framework,
           "--output", "json"]
    if skips is not None:
        cmd += ["--skip-check", ",".join(skips)]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_REDIRECT": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode in (0, 1), f"checkov failed to run ({proc.returncode}):\n{proc.stderr[-3000:]}"
    start = proc.stdout.find("[") if proc.stdout.lstrip().startswith("[") else proc.stdout.find("{")
    reports = json.loads(proc.stdout[start:])
    return reports if isinstance(reports, list) else [reports]


def _failures(reports: list[dict[str, Any]]) -> list[str]:
    out = []
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        for check in report["results"]["failed_checks"]:
            out.append(f"{check['check_id']} {check['check_name']}: {check['resource']} ({check['file_path']})")
    return out


def _passed(reports: list[dict[str, Any]]) -> int:
    return sum(r["summary"]["passed"] for r in reports)


def test_every_skip_has_a_reason() -> None:
    config = _config()
    text = CONFIG.read_text()
    for check in config["skip-check"] + TEMPLATE_ONLY_SKIPS:
        m = re.search(rf"^#\s+{check}\s+\S.{{20,}}$", text, re.M)
        assert m, f"{check} is skipped without a reason in .checkov.yaml"
    assert config.get("skip-download") is True  # offline: no calls to the Prisma Cloud API


def test_dockerfiles_pass() -> None:
    reports = _run(IMAGES, "dockerfile")
    failures = _failures(reports)
    assert not failures, "\n".join(failures)
    assert _passed(reports) > 0


def test_rendered_overlays_pass(tmp_path: Path) -> None:
    for overlay in DEPLOYABLE:
        (tmp_path / f"{overlay.replace('/', '-')}.yaml").write_text(rendered_text(overlay))
    reports = _run(tmp_path, "kubernetes")
    failures = _failures(reports)
    assert not failures, "\n".join(failures)
    assert _passed(reports) > 100


def test_rendered_run_templates_pass(tmp_path: Path) -> None:
    (tmp_path / "templates.yaml").write_text(rendered_text("overlays/prod/templates"))
    reports = _run(tmp_path, "kubernetes", _config()["skip-check"] + TEMPLATE_ONLY_SKIPS)
    failures = _failures(reports)
    assert not failures, "\n".join(failures)
    assert _passed(reports) > 0
