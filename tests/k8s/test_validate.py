"""Offline validation: every object the backend would create passes; broken ones fail with all errors."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowgrpo.backends.base import RewardServerSpec, TrainJobSpec
from flowgrpo.k8s import objects
from flowgrpo.k8s.validate import ManifestError, schema_errors, validate_file, validate_object
from tests.k8s.conftest import NAMESPACE, RUN_ID

GPU_TOLERATION = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.mark.parametrize(("nodes", "gpus", "extras"), itertools.product((1, 3), (0, 8), (False, True)))
def test_every_pytorchjob_variant_is_valid(nodes: int, gpus: int, extras: bool) -> None:
    job = TrainJobSpec(name="fgrpo-3f2a9c1e", config_uri="s3://b/config.yaml", nodes=nodes, procs_per_node=max(gpus, 1),
                       image="t:1", gpus_per_node=gpus, env={"MLFLOW_RUN_ID": "r"},
                       env_from_secrets=["s3", "mlflow"] if extras else [],
                       tolerations=GPU_TOLERATION if extras else [],
                       node_selector={"pool": "gpu"} if extras else {},
                       service_account="trainer" if extras else "")
    for version in ("1.25", "1.30", "1.37"):
        validate_object(objects.pytorchjob(job, RUN_ID, NAMESPACE), version)


@pytest.mark.parametrize(("gpus", "extras"), itertools.product((0, 2), (False, True)))
def test_every_reward_object_variant_is_valid(gpus: int, extras: bool) -> None:
    spec = RewardServerSpec(name="ocr", rewards=["ocr", "jpeg"], image="r:1", gpus=gpus, replicas=2,
                            api_key_secret="key" if extras else "",
                            reward_options={"ocr": {"lang": "en"}} if extras else {},
                            tolerations=GPU_TOLERATION if extras else [],
                            node_selector={"pool": "gpu"} if extras else {})
    for version in ("1.25", "1.30", "1.37"):
        validate_object(objects.reward_deployment(spec, RUN_ID, NAMESPACE), version)
        validate_object(objects.reward_service(spec, RUN_ID, NAMESPACE), version)
        validate_object(objects.reward_network_policy([spec], RUN_ID, NAMESPACE), version)


def _job() -> dict[str, Any]:
    job = TrainJobSpec(name="fgrpo-x", config_uri="c", nodes=2, image="t:1")
    return objects.pytorchjob(job, RUN_ID, NAMESPACE)


def test_broken_pytorchjob_lists_every_error() -> None:
    pj = _job()
    specs = pj["spec"]["pytorchReplicaSpecs"]
    specs["Worker"]["replicas"] = "1"
    specs["Worker"]["restartPolicy"] = "Sometimes"
    specs["Worker"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    specs["Master"]["template"]["spec"]["containers"][0]["name"] = "main"
    pj["spec"]["runPolicy"]["cleanPodPolicy"] = "Always"
    pj["spec"]["nprocPerNode"] = 8
    with pytest.raises(ManifestError) as err:
        validate_object(pj)
    errors = err.value.errors
    expected = {
        "$.spec.pytorchReplicaSpecs.Worker.replicas": "is not of type 'integer'",
        "$.spec.pytorchReplicaSpecs.Worker.restartPolicy": "is not one of",
        "$.spec.pytorchReplicaSpecs.Worker.template.spec.containers[0]": "'imagee' was unexpected",
        "$.spec.pytorchReplicaSpecs.Master.template.spec.containers": "no container is named 'pytorch'",
        "$.spec.runPolicy.cleanPodPolicy": "is not one of",
        "$.spec.nprocPerNode": "is not of type 'string'",
    }
    for path, problem in expected.items():
        assert any(e.startswith(f"{path}: ") and problem in e for e in errors), (path, errors)
    assert len(errors) == len(expected)
    assert f"PyTorchJob {NAMESPACE}/fgrpo-x" in str(err.value) and "6 schema error(s)" in str(err.value)


def test_pytorchjob_without_master_or_with_two_masters_is_rejected() -> None:
    pj = _job()
    del pj["spec"]["pytorchReplicaSpecs"]["Master"]
    assert schema_errors(pj) == ["$.spec.pytorchReplicaSpecs: 'Master' is a required property"]
    pj = _job()
    pj["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    assert schema_errors(pj) == ["$.spec.pytorchReplicaSpecs.Master.replicas: 2 is greater than the maximum of 1"]
    pj = _job()
    pj["spec"]["pytorchReplicaSpecs"]["Chief"] = pj["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert schema_errors(pj) == ["$.spec.pytorchReplicaSpecs: Additional properties are not allowed "
                                 "('Chief' was unexpected)"]


def test_broken_deployment_lists_every_error() -> None:
    spec = RewardServerSpec(name="ocr", rewards=["ocr"], image="r:1")
    dep = objects.reward_deployment(spec, RUN_ID, NAMESPACE)
    dep["spec"]["replicas"] = "one"
    dep["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    dep["spec"]["template"]["spec"]["nodeSelector"] = {"pool": 3}
    with pytest.raises(ManifestError) as err:
        validate_object(dep)
    paths = [e.split(": ", 1)[0] for e in err.value.errors]
    assert paths == ["$.spec.replicas", "$.spec.template.spec.containers[0]", "$.spec.template.spec.nodeSelector.pool"]


def test_unknown_kind_and_bad_input() -> None:
    with pytest.raises(ManifestError, match="no schema for kind 'TFJob'"):
        validate_object({"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": {"name": "x"}})
    assert schema_errors({"metadata": {}}) == ["$: 'apiVersion' is missing or not a string",
                                               "$: 'kind' is missing or not a string"]
    assert schema_errors(["not", "an", "object"])[0].startswith("$: expected a Kubernetes object")
    with pytest.raises(ValueError, match="bundles schemas for"):
        validate_object(_job(), "1.12")
    with pytest.raises(ValueError, match="expected MAJOR.MINOR"):
        validate_object(_job(), "latest")


def test_validate_file(tmp_path: Path) -> None:
    spec = RewardServerSpec(name="ocr", rewards=["ocr"], image="r:1")
    docs = [objects.reward_deployment(spec, RUN_ID, NAMESPACE), objects.reward_service(spec, RUN_ID, NAMESPACE), _job()]
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump_all(docs))
    assert validate_file(good) == [f"Deployment/{docs[0]['metadata']['name']}",
                                   f"Service/{docs[1]['metadata']['name']}", "PyTorchJob/fgrpo-x"]
    broken = copy.deepcopy(docs)
    broken[1]["spec"]["type"] = 5
    del broken[2]["spec"]["pytorchReplicaSpecs"]["Master"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(broken))
    with pytest.raises(ManifestError) as err:
        validate_file(bad)
    assert len(err.value.errors) == 2
    assert err.value.errors[0].startswith(f"document 1 (Service/{docs[1]['metadata']['name']}) $.spec.type:")
    assert err.value.errors[1] == "document 2 (PyTorchJob/fgrpo-x) $.spec.pytorchReplicaSpecs: " \
                                  "'Master' is a required property"
