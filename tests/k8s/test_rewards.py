"""Reward servers against the fake API server: deploy, wait, redeploy, time out."""

from __future__ import annotations

import pytest
from kubernetes import client

from flowgrpo.backends.base import RUN_ID_LABEL, BackendError, RewardServerSpec
from flowgrpo.k8s import objects, rewards
from flowgrpo.k8s.validate import ManifestError
from tests.k8s.conftest import NAMESPACE, RUN_ID
from tests.k8s.fake_apiserver import FakeKube


def test_deploy_creates_objects_and_returns_urls(kube: FakeKube, api: client.ApiClient,
                                                 reward_specs: list[RewardServerSpec]) -> None:
    kube.deployments_ready_after_reads = 3  # available only on the third status read
    urls = rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)

    ocr, cheap = (objects.reward_object_name(s, RUN_ID) for s in reward_specs)
    assert urls == {"ocr": f"http://{ocr}.{NAMESPACE}.svc.cluster.local:8000",
                    "jpeg_compressibility": f"http://{cheap}.{NAMESPACE}.svc.cluster.local:8080",
                    "aesthetic": f"http://{cheap}.{NAMESPACE}.svc.cluster.local:8080"}
    assert len(kube.calls("GET", "deployments")) == 6  # it waited for every server to become available
    deployments = {d["metadata"]["name"]: d for d in kube.list("deployments", NAMESPACE)}
    services = {s["metadata"]["name"]: s for s in kube.list("services", NAMESPACE)}
    assert set(deployments) == set(services) == {ocr, cheap}
    dep = deployments[ocr]
    assert dep["metadata"]["labels"][RUN_ID_LABEL] == RUN_ID
    assert dep["metadata"]["labels"]["flowgrpo.io/reward-server"] == "ocr"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert services[cheap]["spec"]["ports"][0]["port"] == 8080
    assert services[cheap]["metadata"]["labels"][RUN_ID_LABEL] == RUN_ID


def test_redeploy_replaces_in_place(kube: FakeKube, api: client.ApiClient,
                                    reward_specs: list[RewardServerSpec]) -> None:
    """A retried deploy task: 409 on create, then replace with the resourceVersion and the cluster IP."""
    first = rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    ips = {s["metadata"]["name"]: s["spec"]["clusterIP"] for s in kube.list("services")}
    reward_specs[0].replicas = 2
    assert rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01) == first
    assert len(kube.calls("POST", "deployments")) == 4 and len(kube.calls("PUT", "deployments")) == 2
    assert len(kube.calls("PUT", "services")) == 2
    assert all(r.body["metadata"]["resourceVersion"] for r in kube.calls("PUT", "deployments"))
    assert {s["metadata"]["name"]: s["spec"]["clusterIP"] for s in kube.list("services")} == ips
    ocr = kube.get("deployments", NAMESPACE, objects.reward_object_name(reward_specs[0], RUN_ID))
    assert ocr["spec"]["replicas"] == 2 and ocr["metadata"]["generation"] == 2
    assert len(kube.list("deployments")) == 2


def test_replace_retries_a_conflict(kube: FakeKube, api: client.ApiClient,
                                    reward_specs: list[RewardServerSpec]) -> None:
    rewards.deploy(reward_specs[:1], RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    kube.fail_next = [("PUT", "deployments", 409)]
    rewards.deploy(reward_specs[:1], RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    assert len(kube.calls("PUT", "deployments")) == 2


def test_deploy_timeout_names_the_server_with_its_pods_story(kube: FakeKube, api: client.ApiClient,
                                                             reward_specs: list[RewardServerSpec]) -> None:
    kube.deployments_available = False
    with pytest.raises(BackendError) as err:
        rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=0.2, poll_s=0.02)
    message = str(err.value)
    name = objects.reward_object_name(reward_specs[0], RUN_ID)
    assert f"reward server 'ocr' (Deployment {NAMESPACE}/{name}) is not available after 0.2s" in message
    assert "0/1 replicas available" in message
    assert "also not available: cheap" in message
    assert "MinimumReplicasUnavailable" in message
    assert "waiting: CrashLoopBackOff" in message and "restarts=4" in message
    assert "BackOff: Back-off restarting failed container" in message
    assert "| RuntimeError: model weights not found" in message


def test_malformed_spec_fails_before_any_request(kube: FakeKube, api: client.ApiClient) -> None:
    bad = RewardServerSpec(name="ocr", rewards=["ocr"], image="r:1",
                           tolerations=[{"key": "gpu", "operater": "Exists"}])
    with pytest.raises(ManifestError, match="'operater' was unexpected"):
        rewards.deploy([bad], RUN_ID, NAMESPACE, api, timeout_s=1, poll_s=0.01)
    assert kube.requests == []


def test_a_reward_served_twice_is_refused(kube: FakeKube, api: client.ApiClient) -> None:
    specs = [RewardServerSpec(name=n, rewards=["ocr"], image="r") for n in ("a", "b")]
    with pytest.raises(ValueError, match="'ocr' is served by more than one server"):
        rewards.deploy(specs, RUN_ID, NAMESPACE, api, timeout_s=1, poll_s=0.01)
    with pytest.raises(ValueError, match="'a' is used twice"):
        rewards.deploy([specs[0], specs[0]], RUN_ID, NAMESPACE, api, timeout_s=1, poll_s=0.01)
    assert kube.requests == []


def test_create_error_names_the_object(kube: FakeKube, api: client.ApiClient,
                                       reward_specs: list[RewardServerSpec]) -> None:
    kube.fail_next = [("POST", "services", 403)]
    with pytest.raises(BackendError, match=r"creating Service team-a/fgrpo-rw-ocr-\S+ failed: 403"):
        rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=1, poll_s=0.01)
