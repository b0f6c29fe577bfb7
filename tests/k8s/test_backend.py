"""The ``kubernetes`` backend end to end against the fake API server, and how it finds the cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.config import kube_config

from flowgrpo.backends.base import BackendError, RewardServerSpec, TrainJobSpec, get_backend
from flowgrpo.backends.kubernetes import KubernetesBackend
from flowgrpo.k8s.client import api_client, current_namespace
from tests.k8s.conftest import NAMESPACE, RUN_ID
from tests.k8s.fake_apiserver import FakeKube


def test_backend_runs_a_whole_run(kube: FakeKube, api: client.ApiClient, reward_specs: list[RewardServerSpec],
                                  train_job: TrainJobSpec) -> None:
    backend = get_backend("kubernetes", namespace=NAMESPACE, api_client=api, poll_s=0.01)
    assert isinstance(backend, KubernetesBackend) and backend.name == "kubernetes"
    urls = backend.deploy_rewards(RUN_ID, reward_specs, timeout_s=5)
    assert set(urls) == {"ocr", "jpeg_compressibility", "aesthetic"}
    lines: list[str] = []
    result = backend.train(RUN_ID, train_job, log=lines.append)
    assert result["job"] == train_job.name and result["wall_s"] >= 0
    assert any("training done" in line for line in lines)
    assert len(backend.teardown(RUN_ID)) == 6  # job, 2 Deployments, 2 Services, the run's NetworkPolicy
    assert backend.teardown(RUN_ID) == []
    assert kube.list("deployments") == kube.list("services") == kube.list("pytorchjobs") == []
    assert kube.list("networkpolicies") == []


def test_backend_resolves_cluster_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "missing"))
    backend = KubernetesBackend(namespace="ns")  # no cluster: constructing it is fine
    with pytest.raises(BackendError, match="no Kubernetes credentials"):
        backend.teardown(RUN_ID)


def _kubeconfig(path: Path, server: str, namespace: str | None) -> Path:
    context = {"cluster": "c", "user": "u", **({"namespace": namespace} if namespace else {})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "ctx", "context": context}],
    }))
    return path


def test_api_client_from_kubeconfig(kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = _kubeconfig(tmp_path / "config", kube.url, "from-context")
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(config))
    made = api_client()
    assert made.configuration.host == kube.url
    assert client.CoreV1Api(made).list_namespaced_pod("x").items == []
    assert kube.requests[-1].path == "/api/v1/namespaces/x/pods"
    given = kube.api_client()
    assert api_client(given) is given


def test_current_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sa_file = tmp_path / "namespace"
    sa_file.write_text("kubeflow-user\n")
    assert current_namespace(sa_file) == "kubeflow-user"
    missing = tmp_path / "nowhere"
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        str(_kubeconfig(tmp_path / "config", "http://127.0.0.1:1", "from-context")))
    assert current_namespace(missing) == "from-context"
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        str(_kubeconfig(tmp_path / "config2", "http://127.0.0.1:1", None)))
    assert current_namespace(missing) == "default"
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(missing))
    assert current_namespace(missing) == "default"
