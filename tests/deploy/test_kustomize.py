"""The kustomize tree builds offline, every object validates strictly against Kubernetes 1.30 (PyTorchJobs
against the envelope schema), and every container is locked down (orchestration.md §4)."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from components.images import COMPONENT_IMAGE, REGISTRY, REWARD_IMAGE, TRAINER_IMAGE, VERSION
from flowgrpo.k8s.validate import schema_errors
from pipelines.flow_grpo import DEFAULTS
from tests.deploy.conftest import (
    FULL,
    K8S_VERSION,
    KUSTOMIZATIONS,
    MANIFESTS,
    name_of,
    pod_template,
    rendered,
)

NAMESPACE = "flowgrpo"


def test_every_kustomization_is_known() -> None:
    """Each kustomization.yaml is either built here or a Component (built through the overlays)."""
    found = set()
    for path in MANIFESTS.rglob("kustomization.yaml"):
        text = path.read_text()
        if re.search(r"^kind:\s*Component\s*$", text, re.M):
            continue
        found.add(str(path.parent.relative_to(MANIFESTS)))
    assert found == set(KUSTOMIZATIONS)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builds_and_validates_strictly(kustomization: str) -> None:
    objs = rendered(kustomization)
    assert objs, f"manifests/{kustomization} renders nothing"
    errors = [f"{name_of(o)}: {e}" for o in objs for e in schema_errors(o, K8S_VERSION)]
    assert not errors, "\n".join(errors)
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"


@pytest.mark.parametrize("overlay", FULL)
def test_overlays_contain_what_the_pipeline_refers_to(overlay: str) -> None:
    objs = {(o["kind"], o["metadata"]["name"]): o for o in rendered(overlay)}
    for o in objs.values():
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, f"{name_of(o)} outside {NAMESPACE}"
    assert ("Namespace", NAMESPACE) in objs
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert (kind, "flowgrpo-pipeline-runner") in objs
    assert ("NetworkPolicy", "flowgrpo-reward-servers-default-deny") in objs
    # the pipeline's default tracking_uri is this Service
    m = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", DEFAULTS["tracking_uri"])
    assert m, DEFAULTS["tracking_uri"]
    service = objs[("Service", m[1])]
    assert m[2] == NAMESPACE and [p["port"] for p in service["spec"]["ports"]] == [int(m[3])]
    mlflow = objs[("Deployment", "mlflow")]
    (container,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert "--serve-artifacts" in container["args"]
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "flowgrpo-mlflow-db",
                                                                              "key": "backend-store-uri"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "flowgrpo-mlflow-s3"
    assert objs[("ConfigMap", "mlflow-config")]["data"]["artifacts-destination"].startswith("s3://")
    # the MLflow image is built by images/mlflow with the same registry and version as the pipeline's images
    assert container["image"] == f"{REGISTRY}/flowgrpo-mlflow:{VERSION}"


def test_no_secret_values_are_committed() -> None:
    """Only the dev overlay generates Secrets, and every value in them says it is a dev value."""
    for kustomization in KUSTOMIZATIONS:
        secrets = [o for o in rendered(kustomization) if o["kind"] == "Secret"]
        if kustomization != "overlays/dev":
            assert secrets == [], f"manifests/{kustomization} contains Secrets"
            continue
        assert {s["metadata"]["name"] for s in secrets} >= {DEFAULTS["storage_secret"], "flowgrpo-mlflow-db",
                                                           DEFAULTS["reward_api_key_secret"]}
        for s in secrets:
            for key, value in s.get("data", {}).items():
                text = base64.b64decode(value).decode()
                if any(word in key for word in ("PASSWORD", "SECRET", "API_KEY")) or key == "backend-store-uri":
                    assert "dev-only" in text, f"{s['metadata']['name']}.{key} does not look like a dev value"


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def _all_workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(k, o) for k in KUSTOMIZATIONS for o in rendered(k) if list(pod_template(o))]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_is_locked_down(kustomization: str) -> None:
    problems = []
    for obj in rendered(kustomization):
        for where, pod in pod_template(obj):
            spec = pod["spec"]
            pod_sc = spec.get("securityContext", {})
            what = f"{name_of(obj)} ({where})"
            if spec.get("automountServiceAccountToken") is not False:
                problems.append(f"{what}: automountServiceAccountToken is not false")
            if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
                problems.append(f"{what}: uses the host's namespaces")
            writable = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v or "persistentVolumeClaim" in v}
            for c in _containers(pod):
                sc = c.get("securityContext", {})
                cw = f"{what} container {c['name']}"
                if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
                    problems.append(f"{cw}: runAsNonRoot")
                if sc.get("runAsUser", pod_sc.get("runAsUser", 1)) == 0:
                    problems.append(f"{cw}: runs as uid 0")
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{cw}: allowPrivilegeEscalation")
                if sc.get("privileged"):
                    problems.append(f"{cw}: privileged")
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{cw}: readOnlyRootFilesystem")
                if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                    problems.append(f"{cw}: capabilities must drop ALL and add none")
                seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
                if seccomp.get("type") != "RuntimeDefault":
                    problems.append(f"{cw}: seccompProfile RuntimeDefault")
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    if not {"cpu", "memory"} <= set(res.get(part, {})):
                        problems.append(f"{cw}: {part} must set cpu and memory")
                image = c["image"]
                if ":" not in image.rsplit("/", 1)[-1] and "@sha256:" not in image:
                    problems.append(f"{cw}: image {image} has no tag")
                if image.endswith(":latest") or ":latest@" in image:
                    problems.append(f"{cw}: image {image} uses latest")
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                if mounts.get("/tmp") not in writable:
                    problems.append(f"{cw}: /tmp is not a writable volume (the root filesystem is read-only)")
                servers = obj["kind"] == "Deployment"
                if servers and not (c.get("readinessProbe") and c.get("livenessProbe")):
                    problems.append(f"{cw}: a server needs readiness and liveness probes")
    assert not problems, "\n".join(problems)


def test_workloads_were_found() -> None:
    """The lock-down test above saw the servers and jobs it is meant to check."""
    names = {f"{k}:{name_of(o)}" for k, o in _all_workloads()}
    for expected in ("overlays/dev:Deployment/mlflow", "overlays/dev:Deployment/minio",
                     "overlays/dev:Deployment/postgres", "overlays/dev:Job/minio-buckets",
                     "overlays/prod:Deployment/mlflow"):
        assert expected in names
    kinds = {o["kind"] for k, o in _all_workloads() if k.endswith("templates")}
    assert kinds == {"Deployment", "PyTorchJob"}


@pytest.mark.parametrize("overlay", FULL)
def test_every_pod_is_covered_by_a_network_policy(overlay: str) -> None:
    objs = rendered(overlay)
    selectors = [o["spec"]["podSelector"].get("matchLabels", {}) for o in objs if o["kind"] == "NetworkPolicy"]
    for obj in objs:
        for _, pod in pod_template(obj):
            labels = pod["metadata"].get("labels", {})
            assert any(sel.items() <= labels.items() for sel in selectors), f"{name_of(obj)} has no NetworkPolicy"


def test_template_images_are_the_pipelines() -> None:
    images = {c["image"] for k in ("base/templates", "overlays/prod/templates") for o in rendered(k)
              for _, pod in pod_template(o) for c in _containers(pod)}
    assert images == {REWARD_IMAGE, TRAINER_IMAGE}
    assert COMPONENT_IMAGE.startswith(f"{REGISTRY}/flowgrpo-components:")


def test_runner_overlay_is_only_the_runner() -> None:
    objs = rendered("overlays/runner")
    assert {o["kind"] for o in objs} == {"ServiceAccount", "Role", "RoleBinding", "NetworkPolicy"}
    namespaces = {o["metadata"]["namespace"] for o in objs}
    assert len(namespaces) == 1 and namespaces != {NAMESPACE}
    for binding in (o for o in objs if o["kind"] == "RoleBinding"):
        assert binding["subjects"][0]["namespace"] in namespaces
