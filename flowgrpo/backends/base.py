"""The backend protocol: deploy reward servers, run the distributed trainer, tear down by run id.

A *run id* is the KFP run's uuid (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``): every object a backend creates
carries it (Kubernetes label ``flowgrpo.io/run-id``; a state directory for ``local``), so the teardown
step, which cannot read other tasks' outputs when it runs as a KFP exit task, finds everything by that id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

BACKENDS = ("local", "kubernetes")
RUN_ID_LABEL = "flowgrpo.io/run-id"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class BackendError(RuntimeError):
    """A backend operation failed (server not ready, object rejected, ...); the message says what and where."""


class TrainingFailed(BackendError):
    """The training job failed or timed out; ``log_tail`` holds the master's last log lines."""

    def __init__(self, message: str, log_tail: str = ""):
        self.log_tail = log_tail
        super().__init__(message + (f"\n--- last log lines ---\n{log_tail}" if log_tail else ""))


def dns_name(text: str, max_len: int = 63) -> str:
    """``text`` as a DNS-1123 label (lowercase alphanumerics and '-', at most ``max_len``)."""
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    s = s[:max_len].strip("-")
    if not s or not _DNS_LABEL.match(s):
        raise ValueError(f"cannot make a DNS-1123 name of {text!r}")
    return s


@dataclass
class RewardServerSpec:
    """One reward server (``flowgrpo serve-reward``) serving ``rewards``."""

    name: str  # DNS-1123 label, unique within the run (e.g. "jpeg-compressibility")
    rewards: list[str]
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    port: int = 8000
    # kubernetes only
    image: str = ""
    replicas: int = 1
    cpu: str = "2"
    memory: str = "8Gi"
    gpus: int = 0
    #: Secret holding the bearer key (key ``api-key``); empty = no auth (in-cluster only, same namespace)
    api_key_secret: str = ""
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.name) or len(self.name) > 40:
            raise ValueError(f"reward server name {self.name!r}: a DNS-1123 label of at most 40 characters")
        if not self.rewards:
            raise ValueError(f"reward server {self.name!r}: rewards must not be empty")


@dataclass
class TrainJobSpec:
    """The distributed trainer: ``flowgrpo train --config <config_uri>`` on ``nodes`` x ``procs_per_node``."""

    name: str  # DNS-1123 job name, derived from the run id (never fixed at compile time)
    config_uri: str  # the resolved RunConfig YAML in storage (s3://... or a path)
    nodes: int = 1
    procs_per_node: int = 1
    env: dict[str, str] = field(default_factory=dict)  # e.g. MLFLOW_RUN_ID, MLFLOW_TRACKING_URI
    #: names of Secrets whose keys become env vars in every trainer pod (S3 / MLflow credentials)
    env_from_secrets: list[str] = field(default_factory=list)
    timeout_s: float = 24 * 3600
    # kubernetes only
    image: str = ""
    gpus_per_node: int = 0
    cpu: str = "4"
    memory: str = "32Gi"
    shm_size: str = "16Gi"
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    backoff_limit: int = 2
    ttl_seconds_after_finished: int = 3600
    service_account: str = ""

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.name) or len(self.name) > 50:
            raise ValueError(f"train job name {self.name!r}: a DNS-1123 label of at most 50 characters")
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes}: at least 1 (one master; the others are workers)")
        if self.procs_per_node < 1:
            raise ValueError(f"procs_per_node={self.procs_per_node}: at least 1")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s}: must be > 0")

    def command(self) -> list[str]:
        """The trainer's entry point inside each node (torchrun reads PET_* / rank env set by the launcher)."""
        return ["flowgrpo", "train", "--config", self.config_uri]


class Backend(Protocol):
    name: str

    def deploy_rewards(self, run_id: str, specs: list[RewardServerSpec], timeout_s: float = 900) -> dict[str, str]:
        """Start every server, wait until ``/readyz`` answers 200; returns {reward name: base URL}.
        Idempotent (a retry replaces what a failed try left). Raises BackendError naming the server."""

    def train(self, run_id: str, job: TrainJobSpec, log: Any = None) -> dict[str, Any]:
        """Run the job to completion; returns {"job": name, "wall_s": ...}. Succeeded only counts as
        success: failure or timeout raises TrainingFailed with the log tail (and deletes the job on timeout)."""

    def teardown(self, run_id: str) -> list[str]:
        """Delete everything carrying ``run_id``; returns what was deleted. Safe to call twice."""


def get_backend(name: str, **kwargs: Any) -> Backend:
    if name == "local":
        from flowgrpo.backends.local import LocalBackend

        return LocalBackend(**kwargs)
    if name == "kubernetes":
        from flowgrpo.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(**kwargs)
    raise ValueError(f"backend={name!r}: one of {BACKENDS}")
