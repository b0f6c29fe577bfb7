"""The Kubernetes objects of one run, as plain JSON-ready dicts (no API calls here).

Everything is derived from the specs and the run id alone, so a retried KFP task rebuilds byte-identical
objects with the same names: create-or-replace and adopt-on-409 rely on that. Every object (and every pod
template) carries the ``flowgrpo.io/run-id`` label, which is how teardown finds what a run left behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

from flowgrpo.backends.base import RUN_ID_LABEL, RewardServerSpec, TrainJobSpec

APP_LABEL = "app.kubernetes.io/name"
REWARD_SERVER_LABEL = "flowgrpo.io/reward-server"
REWARD_APP = "flowgrpo-reward"
TRAINER_APP = "flowgrpo-trainer"

#: the env var ``flowgrpo serve-reward`` reads its bearer key from, and the Secret key that holds it
API_KEY_ENV = "FLOWGRPO_REWARD_API_KEY"
#: the reward API-key Secret has one key named like the env var, so trainer pods can take it with envFrom
API_KEY_SECRET_KEY = API_KEY_ENV

PYTORCHJOB_GROUP = "kubeflow.org"
PYTORCHJOB_VERSION = "v1"
PYTORCHJOB_PLURAL = "pytorchjobs"
#: the operator requires the training container to carry exactly this name
TRAINER_CONTAINER = "pytorch"
REWARD_CONTAINER = "reward-server"

#: Images run as an arbitrary non-root uid, so every cache must live somewhere writable (orchestration.md §4).
CACHE_ENV = {"HOME": "/tmp", "HF_HOME": "/tmp/hf", "XDG_CACHE_HOME": "/tmp/.cache", "TRITON_CACHE_DIR": "/tmp/.triton"}

#: Every container runs with a read-only root filesystem; ``/tmp`` (where ``CACHE_ENV`` points, and the trainer's
#: scratch ``output_dir``) is an emptyDir instead. It lives on the node's disk (ephemeral storage), not in memory.
TMP_VOLUME = "tmp"
TMP_MOUNT = "/tmp"

#: An Istio sidecar keeps a finished pod alive (the job never completes) and, under STRICT mTLS, refuses the
#: plain HTTP the (sidecar-less) trainer sends to the reward servers; so no pod of ours gets one.
NO_SIDECAR = {"sidecar.istio.io/inject": "false"}

#: What each trainer pod runs before ``job.command()``. The operator sets ``PET_NNODES``,
#: ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``, which torchrun takes
#: as the defaults of its flags, and torchrun then starts ``procs_per_node`` trainer processes with per-process
#: ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``. Running ``flowgrpo train`` bare would be wrong as soon as
#: ``procs_per_node > 1``: the operator's ``WORLD_SIZE`` counts processes while its ``RANK`` counts pods.
#: The trainer image therefore needs ``torchrun`` (part of torch) and ``flowgrpo`` on its ``PATH``.
TRAINER_LAUNCHER = ["torchrun", "--no-python"]

_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def run_label(run_id: str) -> str:
    """``run_id`` as a label value (at most 63 of ``[A-Za-z0-9._-]``, alphanumeric at both ends).

    A KFP run id (a uuid) passes unchanged; teardown selects with the same function, so any id works.
    """
    value = _LABEL_VALUE_BAD.sub("-", run_id)[:63].strip("-._")
    if not value:
        raise ValueError(f"run id {run_id!r} has no letters or digits to make a label value of")
    return value


def run_selector(run_id: str) -> str:
    """The label selector matching every object of the run."""
    return f"{RUN_ID_LABEL}={run_label(run_id)}"


def short_run_id(run_id: str) -> str:
    """13 characters naming the run inside object names: its first 8 alphanumerics plus a 4-hex digest.

    The digest keeps two run ids with a common prefix ("test-run-1", "test-run-2") from sharing names.
    """
    prefix = re.sub(r"[^a-z0-9]", "", run_id.lower())[:8]
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:4]
    return f"{prefix}-{digest}" if prefix else digest


def reward_object_name(spec: RewardServerSpec, run_id: str) -> str:
    """``fgrpo-rw-<server>-<short run id>``: at most 9 + 40 + 1 + 13 = 63 characters, a DNS-1123 label."""
    return f"fgrpo-rw-{spec.name}-{short_run_id(run_id)}"


def reward_url(spec: RewardServerSpec, run_id: str, namespace: str) -> str:
    """The in-cluster base URL of the server's Service."""
    return f"http://{reward_object_name(spec, run_id)}.{namespace}.svc.cluster.local:{spec.port}"


def _labels(run_id: str, app: str, **extra: str) -> dict[str, str]:
    return {RUN_ID_LABEL: run_label(run_id), APP_LABEL: app, **extra}


def _reward_labels(spec: RewardServerSpec, run_id: str) -> dict[str, str]:
    return _labels(run_id, REWARD_APP, **{REWARD_SERVER_LABEL: spec.name})


def _env(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": str(v)} for k, v in values.items()]


def _resources(cpu: str, memory: str, gpus: int) -> dict[str, dict[str, str]]:
    """Requests equal to limits (Guaranteed QoS: the node never evicts us first); GPUs only as a limit,
    which Kubernetes copies to the request."""
    limits = {"cpu": cpu, "memory": memory}
    if gpus > 0:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def _pod_security() -> dict[str, Any]:
    """Non-root by contract: the images declare a numeric non-root ``USER`` (and OpenShift assigns its own
    uid), so no uid is fixed here."""
    return {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> dict[str, Any]:
    """What the restricted Pod Security Standard asks of every container, plus a read-only root filesystem
    (writes go to the ``/tmp`` emptyDir). A non-root process has no effective capabilities anyway; dropping
    them all also stops file capabilities and setuid binaries from granting any."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _tmp_volume() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "emptyDir": {}}


def _require_image(image: str, what: str) -> str:
    if not image:
        raise ValueError(f"{what}: image is empty; the kubernetes backend needs a container image "
                         "(set the spec's image to the reward-server / trainer image)")
    return image


# ------------------------------------------------------------------------------------- reward servers
def reward_command(spec: RewardServerSpec) -> list[str]:
    """The server's command line; without an API key Secret it serves unauthenticated, which is only
    acceptable because the Service is ClusterIP and reached from the run's own namespace."""
    cmd = ["flowgrpo", "serve-reward"]
    for reward in spec.rewards:
        cmd += ["--reward", reward]
    cmd += ["--host", "0.0.0.0", "--port", str(spec.port)]
    if spec.reward_options:
        cmd += ["--reward-options", json.dumps(spec.reward_options, sort_keys=True, separators=(",", ":"))]
    if not spec.api_key_secret:
        cmd.append("--insecure-no-auth")
    return cmd


def reward_deployment(spec: RewardServerSpec, run_id: str, namespace: str) -> dict[str, Any]:
    """The Deployment running ``spec``'s server.

    ``/readyz`` gates traffic (503 until every model has loaded), ``/healthz`` answers as soon as HTTP is up;
    the startup probe gives the process five minutes to start serving before liveness can restart it.
    """
    if spec.replicas < 1:
        raise ValueError(f"reward server {spec.name!r}: replicas={spec.replicas}, at least 1")
    name = reward_object_name(spec, run_id)
    labels = _reward_labels(spec, run_id)
    env = _env(CACHE_ENV)
    if spec.api_key_secret:
        env.append({"name": API_KEY_ENV,
                    "valueFrom": {"secretKeyRef": {"name": spec.api_key_secret, "key": API_KEY_SECRET_KEY}}})

    def probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "timeoutSeconds": 5,
                "failureThreshold": failures}

    container = {
        "name": REWARD_CONTAINER,
        "image": _require_image(spec.image, f"reward server {spec.name!r}"),
        "command": reward_command(spec),
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "env": env,
        "resources": _resources(spec.cpu, spec.memory, spec.gpus),
        "startupProbe": probe("/healthz", 5, 60),
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 6),
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": TMP_MOUNT}],
        "securityContext": _container_security(),
    }
    # reward servers never call the Kubernetes API: no service-account token in their pods
    pod_spec: dict[str, Any] = {"automountServiceAccountToken": False, "containers": [container],
                                "volumes": [_tmp_volume()], "securityContext": _pod_security()}
    if spec.tolerations:
        pod_spec["tolerations"] = spec.tolerations
    if spec.node_selector:
        pod_spec["nodeSelector"] = spec.node_selector
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels, "annotations": dict(NO_SIDECAR)}, "spec": pod_spec},
        },
    }


def reward_service(spec: RewardServerSpec, run_id: str, namespace: str) -> dict[str, Any]:
    """The ClusterIP Service in front of the Deployment (same name, port named ``http``)."""
    labels = _reward_labels(spec, run_id)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": reward_object_name(spec, run_id), "namespace": namespace, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def reward_network_policy_name(run_id: str) -> str:
    """``fgrpo-rw-ingress-<short run id>``: one NetworkPolicy per run covers all its reward servers."""
    return f"fgrpo-rw-ingress-{short_run_id(run_id)}"


def reward_network_policy(specs: list[RewardServerSpec], run_id: str, namespace: str) -> dict[str, Any]:
    """Only the run's own trainer pods may reach the run's reward servers, and only on their ports.

    A NetworkPolicy cannot say "a peer with the same label value as me", so a namespace-wide manifest can
    at best let every trainer reach every reward server; per-run isolation needs this object, created with
    the servers and deleted with them (teardown finds it by the run-id label). Once any policy selects a
    pod for ingress, everything not allowed by some policy is dropped, so this one alone isolates the servers;
    the static default-deny in ``manifests/base`` only covers reward pods that lack theirs. Kubelet probes come
    from the node and are not subject to it on the common CNIs. Egress is left alone (model downloads).
    """
    if not specs:
        raise ValueError("reward_network_policy: no reward servers")
    label = run_label(run_id)
    ports = sorted({spec.port for spec in specs})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": reward_network_policy_name(run_id), "namespace": namespace,
                     "labels": _labels(run_id, REWARD_APP)},
        "spec": {
            "podSelector": {"matchLabels": {RUN_ID_LABEL: label, APP_LABEL: REWARD_APP}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {RUN_ID_LABEL: label, APP_LABEL: TRAINER_APP}}}],
                "ports": [{"protocol": "TCP", "port": port} for port in ports],
            }],
        },
    }


# ------------------------------------------------------------------------------------------- trainer
def _trainer_pod_template(job: TrainJobSpec, run_id: str) -> dict[str, Any]:
    env = _env({**CACHE_ENV, "PYTHONUNBUFFERED": "1", **job.env})  # the job's own env wins
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": _require_image(job.image, f"train job {job.name!r}"),
        "command": TRAINER_LAUNCHER + job.command(),
        "env": env,
        "resources": _resources(job.cpu, job.memory, job.gpus_per_node),
        # NCCL and DataLoader workers share tensors through /dev/shm, which is 64 MiB by default
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": TMP_VOLUME, "mountPath": TMP_MOUNT}],
        # RDMA (InfiniBand / RoCE) clusters may need IPC_LOCK added back for NCCL's memory registration
        "securityContext": _container_security(),
    }
    if job.env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in job.env_from_secrets]
    pod_spec: dict[str, Any] = {
        # the trainer talks to S3, MLflow and the reward servers, never to the Kubernetes API (workload-identity
        # webhooks such as EKS IRSA project their own token, independent of this setting)
        "automountServiceAccountToken": False,
        "containers": [container],
        # dshm is memory-backed: it counts against the container's memory limit
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}}, _tmp_volume()],
        "securityContext": _pod_security(),
    }
    if job.tolerations:
        pod_spec["tolerations"] = job.tolerations
    if job.node_selector:
        pod_spec["nodeSelector"] = job.node_selector
    if job.service_account:
        pod_spec["serviceAccountName"] = job.service_account
    return {"metadata": {"labels": _labels(run_id, TRAINER_APP), "annotations": dict(NO_SIDECAR)},
            "spec": pod_spec}


def pytorchjob(job: TrainJobSpec, run_id: str, namespace: str) -> dict[str, Any]:
    """The ``kubeflow.org/v1`` PyTorchJob: one Master (always: a worker-only job gets no RANK/WORLD_SIZE) and
    ``nodes - 1`` Workers.

    ``cleanPodPolicy: Running`` stops a failed job's surviving pods from holding GPUs; the server-side
    ``activeDeadlineSeconds`` and ``ttlSecondsAfterFinished`` bound the job even if the launcher dies
    without running its SIGTERM handler.
    """
    template = _trainer_pod_template(job, run_id)

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "OnFailure", "template": copy.deepcopy(template)}

    replicas = {"Master": replica(1)}
    if job.nodes > 1:
        replicas["Worker"] = replica(job.nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": job.name, "namespace": namespace, "labels": _labels(run_id, TRAINER_APP)},
        "spec": {
            "nprocPerNode": str(job.procs_per_node),
            "runPolicy": {
                "cleanPodPolicy": "Running",
                "backoffLimit": job.backoff_limit,
                # at least 1: a deadline of 0 would have the operator fail the job at once
                "activeDeadlineSeconds": max(1, int(job.timeout_s)),
                "ttlSecondsAfterFinished": job.ttl_seconds_after_finished,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }
