"""Connecting to the cluster with the official ``kubernetes`` client, and turning its errors into messages.

A KFP task runs in a pod (in-cluster service account); a developer runs from a laptop (kubeconfig). Tests
pass their own :class:`~kubernetes.client.ApiClient` pointing at a fake API server.
"""

from __future__ import annotations

import json
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from flowgrpo.backends.base import BackendError

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def api_client(api_client: client.ApiClient | None = None) -> client.ApiClient:
    """``api_client`` if given; else one from the pod's service account; else from the kubeconfig."""
    if api_client is not None:
        return api_client
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException as in_cluster:
        try:
            config.load_kube_config(client_configuration=cfg)
        except (config.ConfigException, OSError) as kubeconfig:
            raise BackendError(
                "no Kubernetes credentials: not running in a pod with a service account "
                f"({in_cluster}) and no usable kubeconfig ({kubeconfig}); run inside the cluster, set "
                "KUBECONFIG, or use backend=local") from kubeconfig
    return client.ApiClient(cfg)


def current_namespace(sa_namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The namespace we run in: the pod's own (service-account file), else the kubeconfig context's,
    else ``default``. KFP tasks run in the profile namespace, which is where the run's objects belong."""
    try:
        namespace = sa_namespace_file.read_text().strip()
        if namespace:
            return namespace
    except OSError:
        pass
    try:
        _, active = config.list_kube_config_contexts()
        namespace = ((active or {}).get("context") or {}).get("namespace")
        if namespace:
            return namespace
    except (config.ConfigException, OSError):
        pass
    return "default"


def api_error(e: ApiException) -> str:
    """``<code> <reason>: <message>`` from the API server's Status body (its message names the field)."""
    message = ""
    try:
        message = json.loads(e.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        pass
    return f"{e.status} {e.reason}" + (f": {message}" if message else "")
