"""Offline validation of the objects we send, against the Kubernetes OpenAPI schemas bundled with
``kubernetes-validate`` (strict flavour: unknown fields are errors).

Why not just ``kubernetes_validate.validate``: it stops at the first error and has no schema for CRDs, so a
PyTorchJob would have to skip validation entirely. Here every kind is checked with one Draft 2020-12
validator per (Kubernetes version, kind) that lists *all* errors, and the PyTorchJob gets a hand-written
envelope schema whose pod templates ``$ref`` the bundled ``PodTemplateSpec`` (feasibility.md §8). A typo
in a field therefore fails here, with its JSON path, before anything reaches the cluster.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

DEFAULT_K8S_VERSION = "1.30"
_DEFS = "_definitions.json"
_SCHEMA_ROOT = "https://kubernetes.io/api/"
_DIR = re.compile(r"^v(\d+)\.(\d+)\.\d+-local-strict$")


class ManifestError(ValueError):
    """One or more objects do not match their schema; ``errors`` holds one ``<json path>: <problem>`` each."""

    def __init__(self, what: str, errors: list[str]):
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{what}: {len(errors)} schema error(s); fix these fields:\n{lines}")


def _replica_spec(master: bool) -> dict[str, Any]:
    replicas: dict[str, Any] = {"type": "integer", "minimum": 1}
    if master:
        replicas["maximum"] = 1  # the operator rejects a job with more than one master
    pod_template = f"{_DEFS}#/$defs/io.k8s.api.core.v1.PodTemplateSpec"
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["replicas", "template"],
        "properties": {
            "replicas": replicas,
            "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
            "template": {
                "allOf": [
                    {"$ref": pod_template},
                    {   # the operator finds the training container by this name (ports, env injection)
                        "required": ["spec"],
                        "properties": {"spec": {"required": ["containers"], "properties": {"containers": {
                            "contains": {"required": ["name"], "properties": {"name": {"const": "pytorch"}}},
                        }}}},
                    },
                ],
            },
        },
    }


#: ``kubeflow.org/v1`` PyTorchJob as the training operator (release-1.9) accepts it; only the fields we use
#: or might plausibly use are allowed, so a misspelt one is an error rather than silently ignored.
PYTORCHJOB_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"{_SCHEMA_ROOT}pytorchjob-kubeflow-v1.json",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {"allOf": [{"$ref": f"{_DEFS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
                               {"required": ["name"]}]},
        "status": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["pytorchReplicaSpecs"],
            "properties": {
                "nprocPerNode": {"type": "string", "pattern": "^(auto|cpu|gpu|[1-9][0-9]*)$"},
                "runPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "cleanPodPolicy": {"enum": ["None", "Running", "All"]},
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "suspend": {"type": "boolean"},
                        "managedBy": {"type": "string"},
                        "schedulingPolicy": {"type": "object"},
                    },
                },
                "elasticPolicy": {"type": "object"},
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "additionalProperties": False,
                    # a worker-only job gets no RANK / WORLD_SIZE (kubeflow/trainer #1991)
                    "required": ["Master"],
                    "properties": {"Master": _replica_spec(master=True), "Worker": _replica_spec(master=False)},
                },
            },
        },
    },
}


def _schema_dirs() -> dict[tuple[int, int], Any]:
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    found = {}
    for entry in root.iterdir():
        m = _DIR.match(entry.name)
        if m:
            found[(int(m[1]), int(m[2]))] = entry
    return found


def _schema_dir(k8s_version: str) -> Any:
    """The bundled strict schemas of the newest version not newer than ``k8s_version`` (as kubectl would
    see a cluster of that version)."""
    m = re.match(r"^v?(\d+)\.(\d+)", k8s_version)
    if not m:
        raise ValueError(f"k8s_version={k8s_version!r}: expected MAJOR.MINOR, e.g. '1.30'")
    wanted = (int(m[1]), int(m[2]))
    dirs = _schema_dirs()
    usable = [v for v in dirs if v <= wanted]
    if not usable or wanted > max(dirs):
        have = ", ".join(f"{a}.{b}" for a, b in sorted(dirs))
        raise ValueError(f"k8s_version={k8s_version!r}: kubernetes-validate bundles schemas for {have}")
    return dirs[max(usable)]


def _schema_file(api_version: str, kind: str) -> str:
    """kubernetes-validate's file naming: ``<kind>-<group without domain>-<version>.json``."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return f"{kind.lower()}-{group_version}.json"


@functools.lru_cache(maxsize=32)
def _validator(k8s_version: str, api_version: str, kind: str) -> Draft202012Validator:
    directory = _schema_dir(k8s_version)
    definitions = json.loads((directory / _DEFS).read_text())
    if (api_version, kind) == ("kubeflow.org/v1", "PyTorchJob"):
        schema = PYTORCHJOB_SCHEMA
    else:
        path = directory / _schema_file(api_version, kind)
        if not path.is_file():
            raise ManifestError(f"{kind} ({api_version})", [
                f"$: no schema for kind {kind!r} with apiVersion {api_version!r} in Kubernetes {k8s_version} "
                "(core and built-in kinds, plus kubeflow.org/v1 PyTorchJob, are known)"])
        schema = json.loads(path.read_text())
    registry = Registry().with_resources([
        (definitions["$id"], Resource.from_contents(definitions)),
        (schema["$id"], Resource.from_contents(schema)),
    ])
    return Draft202012Validator(schema, registry=registry)


def _describe(obj: Any) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind', '?')} {ns}{meta.get('name', '?')}"


def schema_errors(obj: Any, k8s_version: str = DEFAULT_K8S_VERSION) -> list[str]:
    """Every schema error of ``obj`` as ``<json path>: <problem>``; empty when it is valid."""
    if not isinstance(obj, dict):
        return [f"$: expected a Kubernetes object (a mapping), got {type(obj).__name__}"]
    missing = [k for k in ("apiVersion", "kind") if not isinstance(obj.get(k), str)]
    if missing:
        return [f"$: {k!r} is missing or not a string" for k in missing]
    try:
        validator = _validator(k8s_version, obj["apiVersion"], obj["kind"])
    except ManifestError as e:
        return e.errors
    errors = sorted(validator.iter_errors(obj), key=lambda e: (e.json_path, e.message))
    return [f"{e.json_path}: {_message(e)}" for e in errors]


def _message(error: Any) -> str:
    """jsonschema's message, minus the repr of a whole container list for the one ``contains`` rule."""
    if error.validator == "contains":
        return "no container is named 'pytorch' (the training operator requires that name)"
    return error.message if len(error.message) <= 300 else error.message[:297] + "..."


def validate_object(obj: Any, k8s_version: str = DEFAULT_K8S_VERSION) -> None:
    """Raise :class:`ManifestError` listing every schema error of ``obj`` (a Deployment, Service,
    PyTorchJob, ...) for Kubernetes ``k8s_version``."""
    errors = schema_errors(obj, k8s_version)
    if errors:
        what = _describe(obj) if isinstance(obj, dict) else "object"
        raise ManifestError(f"{what} (Kubernetes {k8s_version})", errors)


def validate_file(path: str | Path, k8s_version: str = DEFAULT_K8S_VERSION) -> list[str]:
    """Validate every document of a (multi-document) YAML file; returns ``Kind/name`` of each.

    Errors of all documents are collected into one :class:`ManifestError`, each prefixed with the
    document's index and name, so one run shows everything to fix.
    """
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    names, errors = [], []
    for i, doc in enumerate(docs):
        meta = doc.get("metadata") if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict) else {}
        name = f"{doc.get('kind', '?') if isinstance(doc, dict) else '?'}/{meta.get('name', '?')}"
        names.append(name)
        errors += [f"document {i} ({name}) {e}" for e in schema_errors(doc, k8s_version)]
    if errors:
        raise ManifestError(str(path), errors)
    return names
