"""Teardown by the run-id label: everything of the run goes, nothing of other runs, twice is fine."""

from __future__ import annotations

import pytest
from kubernetes import client

from flowgrpo.backends.base import BackendError, RewardServerSpec, TrainingFailed, TrainJobSpec
from flowgrpo.k8s import objects, rewards
from flowgrpo.k8s.pytorchjob import run_job
from tests.k8s.conftest import NAMESPACE, RUN_ID
from tests.k8s.fake_apiserver import FakeKube, JobScript

OTHER_RUN = "9e8d7c6b-0000-4000-8000-000000000000"


def _names(kube: FakeKube, plural: str) -> set[str]:
    return {o["metadata"]["name"] for o in kube.list(plural, NAMESPACE)}


def test_teardown_after_a_failed_job_removes_only_this_run(kube: FakeKube, api: client.ApiClient,
                                                           reward_specs: list[RewardServerSpec],
                                                           train_job: TrainJobSpec) -> None:
    rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    rewards.deploy(reward_specs[:1], OTHER_RUN, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    other_job = TrainJobSpec(name="fgrpo-other", config_uri="c", image="t:1", timeout_s=10)
    run_job(other_job, OTHER_RUN, NAMESPACE, api, poll_s=0.01, log=lambda _: None)
    kube.job_script = JobScript(outcome="Failed")
    with pytest.raises(TrainingFailed):
        run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=0.01, log=lambda _: None)
    other_reward = objects.reward_object_name(reward_specs[0], OTHER_RUN)
    ours = {objects.reward_object_name(s, RUN_ID) for s in reward_specs}

    deleted = rewards.teardown(RUN_ID, NAMESPACE, api)

    policy = objects.reward_network_policy_name(RUN_ID)
    assert sorted(deleted) == sorted([f"PyTorchJob/{train_job.name}"] + [f"Deployment/{n}" for n in ours]
                                     + [f"Service/{n}" for n in ours] + [f"NetworkPolicy/{policy}"])
    assert deleted[0] == f"PyTorchJob/{train_job.name}"  # the training stops first
    assert deleted[-1] == f"NetworkPolicy/{policy}"  # the servers' isolation goes last
    assert _names(kube, "deployments") == _names(kube, "services") == {other_reward}
    assert _names(kube, "networkpolicies") == {objects.reward_network_policy_name(OTHER_RUN)}
    assert _names(kube, "pytorchjobs") == {"fgrpo-other"}
    assert _names(kube, "pods") == {"fgrpo-other-master-0"}
    listed = [r for plural in ("deployments", "services", "pytorchjobs", "networkpolicies")
              for r in kube.calls("GET", plural)]
    for r in listed:
        if r.path.endswith(("/deployments", "/services", "/pytorchjobs", "/networkpolicies")):  # the listings
            assert r.query["labelSelector"] == [f"flowgrpo.io/run-id={RUN_ID}"]

    assert rewards.teardown(RUN_ID, NAMESPACE, api) == []  # twice is fine


def test_objects_vanishing_midway_and_a_missing_crd_are_fine(kube: FakeKube, api: client.ApiClient,
                                                             reward_specs: list[RewardServerSpec]) -> None:
    rewards.deploy(reward_specs, RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    kube.fail_next = [("GET", "pytorchjobs", 404), ("DELETE", "services", 404)]
    deleted = rewards.teardown(RUN_ID, NAMESPACE, api)
    assert len([d for d in deleted if d.startswith("Deployment/")]) == 2
    assert len([d for d in deleted if d.startswith("Service/")]) == 1  # the other one was already gone
    assert kube.list("deployments") == []


def test_teardown_errors_name_the_object(kube: FakeKube, api: client.ApiClient,
                                         reward_specs: list[RewardServerSpec]) -> None:
    rewards.deploy(reward_specs[:1], RUN_ID, NAMESPACE, api, timeout_s=5, poll_s=0.01)
    kube.fail_next = [("DELETE", "deployments", 403)]
    with pytest.raises(BackendError, match=r"deleting Deployment team-a/fgrpo-rw-ocr-\S+ failed: 403"):
        rewards.teardown(RUN_ID, NAMESPACE, api)
    kube.fail_next = [("GET", "services", 403)]
    with pytest.raises(BackendError, match=f"listing Services of run {RUN_ID} in team-a failed: 403"):
        rewards.teardown(RUN_ID, NAMESPACE, api)
