"""The ``kubernetes`` backend: reward servers as Deployments + Services, training as a Kubeflow PyTorchJob,
teardown by the ``flowgrpo.io/run-id`` label.

The cluster connection and the namespace are resolved on first use, not at construction, so a backend can
be built where no cluster is reachable (compiling a pipeline, unit tests). Every object is validated
offline against the Kubernetes schemas before it is sent, so a malformed spec fails before the cluster is
touched.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client as k8s_client

from flowgrpo.backends.base import RewardServerSpec, TrainJobSpec
from flowgrpo.k8s import pytorchjob, rewards
from flowgrpo.k8s.client import api_client, current_namespace
from flowgrpo.k8s.validate import DEFAULT_K8S_VERSION


class KubernetesBackend:
    """``namespace`` defaults to the pod's own (or the kubeconfig context's); ``api_client`` to in-cluster
    credentials, else the kubeconfig. ``poll_s`` paces status reads; ``k8s_version`` picks the schemas that
    objects are validated against."""

    name = "kubernetes"

    def __init__(self, namespace: str | None = None, api_client: k8s_client.ApiClient | None = None,
                 poll_s: float = 5.0, k8s_version: str = DEFAULT_K8S_VERSION):
        self._namespace = namespace
        self._api = api_client
        self.poll_s = poll_s
        self.k8s_version = k8s_version

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            self._namespace = current_namespace()
        return self._namespace

    @property
    def api(self) -> k8s_client.ApiClient:
        if self._api is None:
            self._api = api_client()
        return self._api

    def deploy_rewards(self, run_id: str, specs: list[RewardServerSpec], timeout_s: float = 900) -> dict[str, str]:
        return rewards.deploy(specs, run_id, self.namespace, self.api, timeout_s=timeout_s, poll_s=self.poll_s,
                              k8s_version=self.k8s_version)

    def train(self, run_id: str, job: TrainJobSpec, log: Any = None) -> dict[str, Any]:
        return pytorchjob.run_job(job, run_id, self.namespace, self.api, poll_s=self.poll_s, log=log or print,
                                  k8s_version=self.k8s_version)

    def teardown(self, run_id: str) -> list[str]:
        return rewards.teardown(run_id, self.namespace, self.api)
