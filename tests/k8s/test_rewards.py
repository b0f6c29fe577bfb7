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


def _no_update_verbs(kube: FakeKube) -> None:
    """The pipeline's Role grants no update or patch: nothing may be PUT or PATCHed."""
    assert [r for r in kube.requests if r.method in ("PUT", "PATCH")] == []


def test_redeploy_adopts_unchanged_objects(kube: FakeKube, api: client.ApiClient,
                                           reward_specs: list[RewardServerSpec]) -> None:
    """A retried deploy task with the same specs: 409 on create, same spec hash, so the servers (which may be
    loading their models already) are kept as they are."""
    first = rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    uids = {(plural, o["metadata"]["name"]): o["metadata"]["uid"]
            for plural in ("deployments", "services", "networkpolicies") for o in kube.list(plural)}
    assert len(uids) == 5
    assert rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01) == first
    assert len(kube.calls("POST", "deployments")) == 4 and len(kube.calls("POST", "networkpolicies")) == 2
    assert [r for r in kube.requests if r.method == "DELETE"] == []
    assert {(plural, o["metadata"]["name"]): o["metadata"]["uid"]
            for plural in ("deployments", "services", "networkpolicies") for o in kube.list(plural)} == uids
    _no_update_verbs(kube)


def test_redeploy_of_a_changed_server_deletes_waits_and_creates(kube: FakeKube, api: client.ApiClient,
                                                               reward_specs: list[RewardServerSpec]) -> None:
    first = rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    ocr = objects.reward_object_name(reward_specs[0], RUN_ID)
    old_uid = kube.get("deployments", NAMESPACE, ocr)["metadata"]["uid"]
    kube.delete_linger_reads = 3  # the old Deployment's pods take a while to go (foreground deletion)
    reward_specs[0].replicas = 2
    assert rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01) == first

    (delete,) = kube.calls("DELETE", "deployments")  # only the changed server; its Service is unchanged
    assert delete.path.endswith(f"/deployments/{ocr}") and delete.query["propagationPolicy"] == ["Foreground"]
    assert kube.calls("DELETE", "services") == [] and kube.calls("DELETE", "networkpolicies") == []
    new = kube.get("deployments", NAMESPACE, ocr)
    assert new["spec"]["replicas"] == 2 and new["metadata"]["uid"] != old_uid
    assert "deletionTimestamp" not in new["metadata"]
    # created again only once the old one had gone (GET answered 404)
    after_delete = kube.requests[kube.requests.index(delete) + 1:]
    recreate = next(i for i, r in enumerate(after_delete)
                    if r.method == "POST" and r.path.endswith("/deployments") and r.body["metadata"]["name"] == ocr)
    polls = [r for r in after_delete[:recreate] if r.method == "GET" and r.path.endswith(f"/deployments/{ocr}")]
    assert len(polls) == 4  # three while it was being deleted, then the 404
    assert len(kube.list("deployments")) == 2
    _no_update_verbs(kube)


def test_a_conflicting_object_of_another_run_is_left_alone(kube: FakeKube, api: client.ApiClient,
                                                           reward_specs: list[RewardServerSpec]) -> None:
    squatter = objects.reward_service(reward_specs[0], RUN_ID, NAMESPACE)
    squatter["metadata"]["labels"] = {RUN_ID_LABEL: "someone-else"}
    kube.put(squatter)
    with pytest.raises(BackendError, match=r"Service team-a/fgrpo-rw-ocr-\S+ already exists and belongs to run "
                                           r"'someone-else'"):
        rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    assert [r for r in kube.requests if r.method == "DELETE"] == []
    assert kube.get("services", NAMESPACE, squatter["metadata"]["name"])["metadata"]["labels"] == {
        RUN_ID_LABEL: "someone-else"}


def test_an_object_that_never_goes_away_is_reported(kube: FakeKube, api: client.ApiClient,
                                                    reward_specs: list[RewardServerSpec],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rewards.deploy(reward_specs[:1], RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    monkeypatch.setattr(rewards, "_GONE_TIMEOUT_S", 0.05)
    kube.delete_linger_reads = 10_000  # a stuck finalizer
    reward_specs[0].memory = "16Gi"
    with pytest.raises(BackendError, match=r"Deployment team-a/\S+ was deleted but is still there after 0.05s"):
        rewards.deploy(reward_specs[:1], RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)


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


def test_deploy_timeout_without_access_to_events(kube: FakeKube, api: client.ApiClient,
                                                 reward_specs: list[RewardServerSpec]) -> None:
    """The pipeline's Role grants nothing on events: the message goes without them (asked once)."""
    kube.deployments_available = False
    kube.authorizer = lambda group, resource, verb: resource != "events"
    with pytest.raises(BackendError) as err:
        rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=0.2, poll_s=0.02)
    message = str(err.value)
    assert "is not available after 0.2s" in message and "waiting: CrashLoopBackOff" in message
    assert "| RuntimeError: model weights not found" in message
    assert "event" not in message.replace("events", "")
    assert len(kube.calls("GET", "events")) == 1


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
