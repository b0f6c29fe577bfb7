"""Reward servers on Kubernetes (Deployment + ClusterIP Service each, one ingress NetworkPolicy per run), and
the run's label-based teardown.

``deploy`` is idempotent: names are deterministic from the run id, so a retried task finds what a failed try
left. It needs only the verbs of the pipeline's Role (``manifests/base/role.yaml``: create, get, list, watch,
delete; no update or patch): an object of this run that already exists with the same content (a spec-hash
annotation) is adopted as it is, one with different content is deleted, waited for until it is gone, and
created again. ``teardown`` finds objects by the run-id label only, because it runs as the pipeline's exit task
and cannot read what the other tasks created.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

from kubernetes import client
from kubernetes.client.rest import ApiException

from flowgrpo.backends.base import RUN_ID_LABEL, BackendError, RewardServerSpec
from flowgrpo.k8s.client import api_error
from flowgrpo.k8s.objects import (
    PYTORCHJOB_GROUP,
    PYTORCHJOB_PLURAL,
    PYTORCHJOB_VERSION,
    REWARD_SERVER_LABEL,
    reward_deployment,
    reward_network_policy,
    reward_service,
    reward_url,
    run_label,
    run_selector,
)
from flowgrpo.k8s.validate import DEFAULT_K8S_VERSION, validate_object

#: the content hash a created object carries, so that a retried deploy can tell "same object" from "changed"
SPEC_HASH_ANNOTATION = "flowgrpo.io/spec-hash"
_RECREATE_TRIES = 3  # create -> 409 -> delete -> gone -> create can lose to a concurrent creator; then retry
_GONE_TIMEOUT_S = 300.0  # a deleted object's finalizers (foreground deletion of the pods) may take a while
_DIAG_LOG_LINES = 20
_DIAG_EVENTS = 5


def reward_urls(specs: list[RewardServerSpec], run_id: str, namespace: str) -> dict[str, str]:
    """{reward name: base URL of the server that serves it}; a reward served twice is an error, since the
    trainer could not tell which server to ask."""
    urls: dict[str, str] = {}
    servers: set[str] = set()
    for spec in specs:
        if spec.name in servers:
            raise ValueError(f"reward server name {spec.name!r} is used twice; names must be unique in a run")
        servers.add(spec.name)
        for reward in spec.rewards:
            if reward in urls:
                raise ValueError(f"reward {reward!r} is served by more than one server; list it in one spec")
            urls[reward] = reward_url(spec, run_id, namespace)
    return urls


def deploy(specs: list[RewardServerSpec], run_id: str, namespace: str, api: client.ApiClient,
           timeout_s: float = 900.0, poll_s: float = 5.0,
           k8s_version: str = DEFAULT_K8S_VERSION) -> dict[str, str]:
    """Create every server's Deployment and Service (and the run's ingress NetworkPolicy, first, so that no
    server is ever reachable from other runs), then wait until all are available.

    Every object is built and validated offline first, so a malformed one fails before any API call.
    Returns {reward name: URL} for every reward of every spec. Raises :class:`BackendError` naming the server
    (with its pods' state, events and last log lines) if it is not available within ``timeout_s``.
    """
    urls = reward_urls(specs, run_id, namespace)
    planned = [(spec, reward_deployment(spec, run_id, namespace), reward_service(spec, run_id, namespace))
               for spec in specs]
    bodies = [reward_network_policy(specs, run_id, namespace)] if specs else []
    for _, deployment, service in planned:
        bodies += [deployment, service]
    for body in bodies:
        _stamp(body)
        validate_object(body, k8s_version)

    apps, core, net = client.AppsV1Api(api), client.CoreV1Api(api), client.NetworkingV1Api(api)
    calls: dict[str, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]] = {
        "NetworkPolicy": (net.create_namespaced_network_policy, net.read_namespaced_network_policy,
                          net.delete_namespaced_network_policy),
        "Deployment": (apps.create_namespaced_deployment, apps.read_namespaced_deployment,
                       apps.delete_namespaced_deployment),
        "Service": (core.create_namespaced_service, core.read_namespaced_service, core.delete_namespaced_service),
    }
    for body in bodies:
        _create_or_recreate(body, run_id, namespace, *calls[body["kind"]], poll_s=poll_s)
    _wait_available([(spec, deployment["metadata"]["name"]) for spec, deployment, _ in planned], run_id,
                    namespace, apps, core, timeout_s, poll_s)
    return urls


def _stamp(body: dict[str, Any]) -> None:
    """Annotate ``body`` with the hash of its content (computed without the annotation itself)."""
    meta = body["metadata"]
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != SPEC_HASH_ANNOTATION}
    unstamped = {**body, "metadata": {**meta, "annotations": annotations}}
    digest = hashlib.sha256(json.dumps(unstamped, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    meta["annotations"] = {**annotations, SPEC_HASH_ANNOTATION: digest[:32]}


def _create_or_recreate(body: dict[str, Any], run_id: str, namespace: str, create: Callable[..., Any],
                        read: Callable[..., Any], delete: Callable[..., Any], poll_s: float) -> None:
    """Create ``body``. If it exists (409) and belongs to this run: keep it when its spec hash is ours (a
    retried deploy: the server may be loading its model already), else delete it, wait until it is gone (its
    pods included: foreground deletion) and create it again. An object of another run is never touched."""
    kind, name = body["kind"], body["metadata"]["name"]
    where = f"{kind} {namespace}/{name}"
    for _ in range(_RECREATE_TRIES):
        try:
            create(namespace, body)
            return
        except ApiException as e:
            if e.status != 409:
                raise BackendError(f"creating {where} failed: {api_error(e)}") from e
        try:
            current = read(name, namespace)
        except ApiException as e:
            if e.status == 404:  # deleted in between: create again
                continue
            raise BackendError(f"reading {where} failed: {api_error(e)}") from e
        meta = current.metadata
        owner = (meta.labels or {}).get(RUN_ID_LABEL)
        if owner != run_label(run_id):
            raise BackendError(f"{where} already exists and belongs to run {owner!r}, not {run_label(run_id)!r}: "
                               f"delete it (kubectl delete {kind.lower()} -n {namespace} {name}) and retry")
        wanted = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        if meta.deletion_timestamp is None and (meta.annotations or {}).get(SPEC_HASH_ANNOTATION) == wanted:
            return
        try:
            delete(name, namespace, propagation_policy="Foreground")
        except ApiException as e:
            if e.status != 404:
                raise BackendError(f"deleting the previous {where} failed: {api_error(e)}") from e
        _wait_gone(read, where, name, namespace, poll_s)
    raise BackendError(f"creating {where}: still conflicting after {_RECREATE_TRIES} tries "
                       "(something else keeps creating it)")


def _wait_gone(read: Callable[..., Any], where: str, name: str, namespace: str, poll_s: float) -> None:
    deadline = time.monotonic() + _GONE_TIMEOUT_S
    while True:
        try:
            read(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return
            raise BackendError(f"reading {where} failed: {api_error(e)}") from e
        if time.monotonic() >= deadline:
            raise BackendError(f"{where} was deleted but is still there after {_GONE_TIMEOUT_S:g}s (a stuck "
                               "finalizer?); remove it by hand and retry")
        time.sleep(poll_s)


def _wait_available(servers: list[tuple[RewardServerSpec, str]], run_id: str, namespace: str,
                    apps: client.AppsV1Api, core: client.CoreV1Api, timeout_s: float, poll_s: float) -> None:
    """Poll each (server, Deployment name) until it is available; at the deadline, raise for the first
    one that is not, with what its pods say."""
    waiting = {spec.name: (spec, name) for spec, name in servers}
    deadline = time.monotonic() + timeout_s
    while True:
        last: dict[str, Any] = {}
        for server, (_, name) in list(waiting.items()):
            try:
                last[server] = apps.read_namespaced_deployment(name, namespace)
            except ApiException as e:
                raise BackendError(f"reward server {server!r}: reading Deployment {namespace}/{name} failed: "
                                   f"{api_error(e)}") from e
            if _available(last[server]):
                del waiting[server]
        if not waiting:
            return
        if time.monotonic() >= deadline:
            spec, name = next(iter(waiting.values()))
            raise BackendError(_not_available(spec, run_id, name, namespace, timeout_s, last[spec.name], core,
                                              others=[s for s in waiting if s != spec.name]))
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))


def _available(deployment: Any) -> bool:
    """Rolled out and serving: the controller has seen the latest spec and every replica of it is
    available (ready for ``minReadySeconds``), as ``kubectl rollout status`` checks."""
    want = deployment.spec.replicas if deployment.spec.replicas is not None else 1
    status = deployment.status
    if status is None:
        return False
    if (status.observed_generation or 0) < (deployment.metadata.generation or 0):
        return False
    return (status.updated_replicas or 0) >= want and (status.available_replicas or 0) >= want


def _not_available(spec: RewardServerSpec, run_id: str, name: str, namespace: str, timeout_s: float,
                   deployment: Any, core: client.CoreV1Api, others: list[str]) -> str:
    status = deployment.status
    available = (status.available_replicas or 0) if status else 0
    lines = [f"reward server {spec.name!r} (Deployment {namespace}/{name}) is not available after "
             f"{timeout_s:g}s: {available}/{spec.replicas} replicas available"]
    if others:
        lines.append(f"also not available: {', '.join(others)}")
    for cond in (status.conditions or []) if status else []:
        if cond.status != "True":
            lines.append(f"condition {cond.type}={cond.status} {cond.reason or ''}: {cond.message or ''}")
    lines += _pod_diagnostics(core, namespace, f"{REWARD_SERVER_LABEL}={spec.name},{run_selector(run_id)}")
    lines.append("check the image, the Secret and the node capacity; `kubectl describe pod` shows the rest")
    return "\n".join(lines)


def _pod_diagnostics(core: client.CoreV1Api, namespace: str, selector: str) -> list[str]:
    """Each pod's phase and container state, its last events and log lines: whatever is readable (a missing
    RBAC verb must not hide the timeout itself)."""
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    except ApiException as e:
        return [f"(pods not readable: {api_error(e)})"]
    if not pods:
        return ["no pods were created (quota, admission or a missing Secret? see the ReplicaSet's events)"]
    lines = []
    events_readable = True  # the pipeline's Role grants no access to events: a 403 just leaves them out
    for pod in pods:
        pod_name = pod.metadata.name
        states = []
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            state = cs.state
            if state and state.waiting:
                states.append(f"{cs.name} waiting: {state.waiting.reason} {state.waiting.message or ''}".strip())
            elif state and state.terminated:
                states.append(f"{cs.name} terminated: {state.terminated.reason} (exit {state.terminated.exit_code})")
            states.append(f"restarts={cs.restart_count}")
        lines.append(f"pod {pod_name}: {pod.status.phase if pod.status else '?'} {' '.join(states)}".rstrip())
        if events_readable:
            try:
                events = core.list_namespaced_event(namespace,
                                                    field_selector=f"involvedObject.name={pod_name}").items
                for ev in events[-_DIAG_EVENTS:]:
                    lines.append(f"  event {ev.type} {ev.reason}: {ev.message}")
            except ApiException as e:
                events_readable = e.status not in (401, 403)
        lines += [f"  | {line}" for line in _last_log_lines(core, pod_name, namespace)]
    return lines


def _last_log_lines(core: client.CoreV1Api, pod_name: str, namespace: str) -> list[str]:
    """The container's last lines; a container waiting to restart may only have its previous instance's."""
    for previous in (False, True):
        try:
            log = core.read_namespaced_pod_log(pod_name, namespace, tail_lines=_DIAG_LOG_LINES, previous=previous)
            return (log or "").splitlines()
        except ApiException:
            continue
    return []


# -------------------------------------------------------------------------------------------- teardown
def teardown(run_id: str, namespace: str, api: client.ApiClient) -> list[str]:
    """Delete every PyTorchJob, Deployment, Service and NetworkPolicy labelled with ``run_id``; returns
    ``Kind/name`` of each. Already gone (404) is fine, so it is safe to run twice or after a partial failure.
    The PyTorchJobs go first so that no training keeps running against reward servers that are being removed;
    the NetworkPolicy last, so that the servers are never reachable from other runs while they exist."""
    selector = run_selector(run_id)
    custom, apps, core = client.CustomObjectsApi(api), client.AppsV1Api(api), client.CoreV1Api(api)
    net = client.NetworkingV1Api(api)
    kinds: list[tuple[str, Callable[[], list[str]], Callable[[str], Any]]] = [
        ("PyTorchJob", lambda: _job_names(custom, namespace, selector),
         lambda n: custom.delete_namespaced_custom_object(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace,
                                                          PYTORCHJOB_PLURAL, n, propagation_policy="Background")),
        ("Deployment", lambda: [d.metadata.name for d in
                                apps.list_namespaced_deployment(namespace, label_selector=selector).items],
         lambda n: apps.delete_namespaced_deployment(n, namespace, propagation_policy="Background")),
        ("Service", lambda: [s.metadata.name for s in
                             core.list_namespaced_service(namespace, label_selector=selector).items],
         lambda n: core.delete_namespaced_service(n, namespace)),
        ("NetworkPolicy", lambda: [p.metadata.name for p in
                                   net.list_namespaced_network_policy(namespace, label_selector=selector).items],
         lambda n: net.delete_namespaced_network_policy(n, namespace)),
    ]
    deleted = []
    for kind, names, delete in kinds:
        try:
            found = names()
        except ApiException as e:
            raise BackendError(f"listing {kind}s of run {run_label(run_id)} in {namespace} failed: "
                               f"{api_error(e)}") from e
        for name in found:
            try:
                delete(name)
            except ApiException as e:
                if e.status == 404:
                    continue
                raise BackendError(f"deleting {kind} {namespace}/{name} failed: {api_error(e)}") from e
            deleted.append(f"{kind}/{name}")
    return deleted


def _job_names(custom: client.CustomObjectsApi, namespace: str, selector: str) -> list[str]:
    """The run's PyTorchJobs; none when the cluster has no PyTorchJob CRD (404), as reward-only runs may."""
    try:
        listing = custom.list_namespaced_custom_object(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace,
                                                       PYTORCHJOB_PLURAL, label_selector=selector)
    except ApiException as e:
        if e.status == 404:
            return []
        raise
    return [item["metadata"]["name"] for item in listing.get("items", [])]
