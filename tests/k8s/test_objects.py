"""The object builders: names, labels, the commands the containers run, resources and pod settings."""

from __future__ import annotations

import json
import re

import pytest

from flowgrpo.backends.base import RUN_ID_LABEL, RewardServerSpec, TrainJobSpec
from flowgrpo.cli import build_parser
from flowgrpo.k8s import objects
from tests.k8s.conftest import NAMESPACE, RUN_ID

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


@pytest.mark.parametrize("run_id", [RUN_ID, "test-run-1", "Run_ID.with/odd chars!", "x" * 200, "--a--"])
def test_names_and_labels_are_valid_and_deterministic(run_id: str) -> None:
    spec = RewardServerSpec(name="a" * 40, rewards=["ocr"], image="img")
    name = objects.reward_object_name(spec, run_id)
    assert DNS_LABEL.match(name) and len(name) <= 63
    assert name == objects.reward_object_name(spec, run_id)
    assert LABEL_VALUE.match(objects.run_label(run_id)) and len(objects.run_label(run_id)) <= 63


def test_uuid_run_id_is_its_own_label_and_similar_ids_get_distinct_names() -> None:
    assert objects.run_label(RUN_ID) == RUN_ID
    assert objects.run_selector(RUN_ID) == f"{RUN_ID_LABEL}={RUN_ID}"
    spec = RewardServerSpec(name="ocr", rewards=["ocr"], image="img")
    assert objects.reward_object_name(spec, "test-run-1") != objects.reward_object_name(spec, "test-run-2")
    assert objects.reward_object_name(spec, RUN_ID).startswith("fgrpo-rw-ocr-3f2a9c1e-")
    with pytest.raises(ValueError, match="no letters or digits"):
        objects.run_label("///")


def test_reward_deployment(reward_specs: list[RewardServerSpec]) -> None:
    ocr, cheap = reward_specs
    dep = objects.reward_deployment(ocr, RUN_ID, NAMESPACE)
    labels = {RUN_ID_LABEL: RUN_ID, "app.kubernetes.io/name": "flowgrpo-reward", "flowgrpo.io/reward-server": "ocr"}
    assert dep["metadata"]["labels"] == labels and dep["metadata"]["namespace"] == NAMESPACE
    assert dep["spec"]["selector"]["matchLabels"] == labels == dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == ocr.image
    assert c["command"] == ["flowgrpo", "serve-reward", "--reward", "ocr", "--host", "0.0.0.0", "--port", "8000"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"},
                              "limits": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}}
    env = {e["name"]: e for e in c["env"]}
    assert env["FLOWGRPO_REWARD_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "reward-key", "key": "FLOWGRPO_REWARD_API_KEY"}}
    assert env["HOME"]["value"] == "/tmp" and env["HF_HOME"]["value"] == "/tmp/hf"
    assert pod["tolerations"] == ocr.tolerations and pod["nodeSelector"] == ocr.node_selector
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    # a read-only root filesystem: /tmp (HOME and the caches) is an emptyDir
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    assert pod["automountServiceAccountToken"] is False

    cheap_pod = objects.reward_deployment(cheap, RUN_ID, NAMESPACE)["spec"]["template"]["spec"]
    (c,) = cheap_pod["containers"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert "--insecure-no-auth" in c["command"]
    assert json.loads(c["command"][c["command"].index("--reward-options") + 1]) == {"aesthetic": {"batch": 4}}
    assert "FLOWGRPO_REWARD_API_KEY" not in {e["name"] for e in c["env"]}
    assert "tolerations" not in cheap_pod and "nodeSelector" not in cheap_pod


def test_reward_command_is_what_the_cli_accepts(reward_specs: list[RewardServerSpec]) -> None:
    from flowgrpo.rewards.server import API_KEY_ENV

    assert objects.API_KEY_ENV == API_KEY_ENV
    args = build_parser().parse_args(objects.reward_command(reward_specs[1])[1:])
    assert args.reward == ["jpeg_compressibility", "aesthetic"] and args.port == 8080 and args.insecure_no_auth
    assert json.loads(args.reward_options) == {"aesthetic": {"batch": 4}}


def test_reward_service_and_url(reward_specs: list[RewardServerSpec]) -> None:
    spec = reward_specs[1]
    svc = objects.reward_service(spec, RUN_ID, NAMESPACE)
    dep = objects.reward_deployment(spec, RUN_ID, NAMESPACE)
    assert svc["metadata"]["name"] == dep["metadata"]["name"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert objects.reward_url(spec, RUN_ID, NAMESPACE) == \
        f"http://{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8080"


def test_builders_refuse_specs_the_cluster_would_reject() -> None:
    with pytest.raises(ValueError, match="image is empty"):
        objects.reward_deployment(RewardServerSpec(name="ocr", rewards=["ocr"]), RUN_ID, NAMESPACE)
    with pytest.raises(ValueError, match="replicas=0"):
        objects.reward_deployment(RewardServerSpec(name="ocr", rewards=["ocr"], image="i", replicas=0), RUN_ID, "ns")
    with pytest.raises(ValueError, match="image is empty"):
        objects.pytorchjob(TrainJobSpec(name="j", config_uri="c"), RUN_ID, NAMESPACE)


def test_pytorchjob_single_node(train_job: TrainJobSpec) -> None:
    pj = objects.pytorchjob(train_job, RUN_ID, NAMESPACE)
    assert (pj["apiVersion"], pj["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert pj["metadata"]["name"] == train_job.name
    assert pj["metadata"]["labels"][RUN_ID_LABEL] == RUN_ID
    assert pj["spec"]["nprocPerNode"] == "1"
    assert pj["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 2, "activeDeadlineSeconds": 30,
                                       "ttlSecondsAfterFinished": 3600}
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    assert list(replicas) == ["Master"]
    master = replicas["Master"]
    assert master["replicas"] == 1 and master["restartPolicy"] == "OnFailure"
    template = master["template"]
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert template["metadata"]["labels"][RUN_ID_LABEL] == RUN_ID
    (c,) = template["spec"]["containers"]
    assert c["name"] == "pytorch" and c["image"] == train_job.image
    assert c["command"] == ["torchrun", "--no-python", *train_job.command()]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["MLFLOW_RUN_ID"] == "abc" and env["HOME"] == "/tmp" and env["HF_HOME"] == "/tmp/hf"
    assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "32Gi"}
    assert c["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    assert template["spec"]["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
                                           {"name": "tmp", "emptyDir": {}}]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert template["spec"]["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert template["spec"]["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in template["spec"] and "tolerations" not in template["spec"]
    # the trainer command parses with the real CLI (torchrun --no-python runs `flowgrpo <rest>`)
    args = build_parser().parse_args(c["command"][3:])
    assert args.config == train_job.config_uri


def test_pytorchjob_multi_node_gpu() -> None:
    job = TrainJobSpec(name="fgrpo-big", config_uri="s3://c.yaml", nodes=3, procs_per_node=8, image="t:1",
                       gpus_per_node=8, timeout_s=0.5, service_account="flowgrpo-trainer",
                       tolerations=[{"key": "gpu", "operator": "Exists"}], node_selector={"pool": "a100"},
                       env={"HOME": "/work"})
    pj = objects.pytorchjob(job, RUN_ID, NAMESPACE)
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert replicas["Worker"]["template"] == replicas["Master"]["template"]
    assert replicas["Worker"]["template"] is not replicas["Master"]["template"]
    assert pj["spec"]["nprocPerNode"] == "8"
    assert pj["spec"]["runPolicy"]["activeDeadlineSeconds"] == 1  # never 0, which would fail the job at once
    spec = replicas["Worker"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert spec["serviceAccountName"] == "flowgrpo-trainer"
    assert spec["tolerations"] == job.tolerations and spec["nodeSelector"] == {"pool": "a100"}
    assert {e["name"]: e["value"] for e in spec["containers"][0]["env"]}["HOME"] == "/work"  # the job's env wins


def test_reward_network_policy_admits_only_the_runs_trainers(reward_specs: list[RewardServerSpec]) -> None:
    policy = objects.reward_network_policy(reward_specs, RUN_ID, NAMESPACE)
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["metadata"]["name"] == objects.reward_network_policy_name(RUN_ID)
    assert policy["metadata"]["labels"][RUN_ID_LABEL] == RUN_ID  # teardown finds it
    dep = objects.reward_deployment(reward_specs[0], RUN_ID, NAMESPACE)
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= dep["spec"]["template"]["metadata"]["labels"].items()  # selects the servers ...
    other = objects.reward_deployment(reward_specs[0], "another-run", NAMESPACE)
    assert not selected.items() <= other["spec"]["template"]["metadata"]["labels"].items()  # ... of this run only
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    trainer = objects.pytorchjob(TrainJobSpec(name="j", config_uri="c", image="t:1"), RUN_ID, NAMESPACE)
    trainer_labels = trainer["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= trainer_labels.items()
    assert "namespaceSelector" not in peer  # the run's own namespace only
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}, {"protocol": "TCP", "port": 8080}]
    with pytest.raises(ValueError, match="no reward servers"):
        objects.reward_network_policy([], RUN_ID, NAMESPACE)
