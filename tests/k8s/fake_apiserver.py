"""A fake Kubernetes API server for the k8s tests: real HTTP on 127.0.0.1, in-memory objects.

It speaks enough of the REST API for what the backend calls through the official client: create / get /
list (labelSelector, fieldSelector) / replace / merge-patch / delete of apps/v1 deployments, v1 services,
pods and events, networking.k8s.io/v1 networkpolicies and kubeflow.org/v1 pytorchjobs; ``pods/{name}/log``
with ``tailLines`` and ``follow`` (chunked, like the real server). Errors are real ``Status`` objects (404
NotFound, 409 AlreadyExists / Conflict, 403 Forbidden). Every request is recorded in
:attr:`FakeKube.requests`; :func:`rbac_attributes` says which RBAC (API group, resource, verb) it needs, and
:attr:`FakeKube.authorizer`, when set, refuses (403) whatever it does not allow, as RBAC would.

Deletion is immediate unless :attr:`FakeKube.delete_linger_reads` is set: then a deleted object stays (with a
``deletionTimestamp``, still answering 409 to a create) for that many GETs, like one whose finalizers run.

The "controllers" are scripted by the test:

* Deployments: :attr:`FakeKube.deployments_available` (and ``deployments_ready_after_reads``). When not
  available, each Deployment gets a crash-looping pod with :attr:`FakeKube.crash_log` and a BackOff event.
* PyTorchJobs: :attr:`FakeKube.job_script` (:class:`JobScript`). A created job gets a master pod and
  ``Worker.replicas`` worker pods (with the training-operator labels) and the ``Created`` condition; on
  the first status read it turns ``Running`` (pods running, the master's log all but its last line); after
  ``after_reads`` status reads or ``after_s`` seconds it ends ``Succeeded`` or ``Failed`` (pods terminated,
  the last log line written), or never with ``outcome="Running"``.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubernetes import client

# plural -> (apiVersion, kind)
RESOURCES = {
    "deployments": ("apps/v1", "Deployment"),
    "services": ("v1", "Service"),
    "pods": ("v1", "Pod"),
    "events": ("v1", "Event"),
    "pytorchjobs": ("kubeflow.org/v1", "PyTorchJob"),
    "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy"),
}
_PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/(?P<ns>[^/]+)/"
                   r"(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")
_NOW = "2024-01-01T00:00:00Z"
JOB_NAME = "training.kubeflow.org/job-name"
REPLICA_TYPE = "training.kubeflow.org/replica-type"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class JobScript:
    """What the fake training operator does with every PyTorchJob created."""

    outcome: str = "Succeeded"  # "Succeeded" | "Failed" | "Running" (never ends)
    after_reads: int | None = 2  # end at this many status reads (GETs of the job) ...
    after_s: float | None = None  # ... or this many seconds after creation
    master_log: list[str] = field(default_factory=lambda: ["epoch 0 step 1 loss 0.50", "epoch 0 step 2 loss 0.40",
                                                           "training done"])
    worker_log: list[str] = field(default_factory=lambda: ["worker ready"])
    reason: str = ""  # of the final condition
    message: str = ""
    failed_replica: str = "master"  # whose pod exits 1 when the outcome is Failed: "master" or "worker"
    master_replica_type: str = "master"  # the label value; older operators wrote "Master"


def rbac_attributes(request: Request) -> tuple[str, str, str] | None:
    """(API group, resource[/subresource], verb) that RBAC checks for ``request``; None for a path outside
    the namespaced resource API."""
    m = _PATH.match(request.path)
    if not m:
        return None
    group = "" if m["core"] else m["group"]
    resource = m["plural"] + (f"/{m['sub']}" if m["sub"] else "")
    named = m["name"] is not None
    if request.method == "GET":
        verb = "get" if named else "watch" if request.query.get("watch", ["false"])[0] == "true" else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if named else "deletecollection"}.get(request.method, request.method.lower())
    return group, resource, verb


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


# --------------------------------------------------------------------------------------------- selectors
def _split_terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        terms.append(current.strip())
    return terms


def label_match(selector: str, labels: dict[str, str]) -> bool:
    """Equality (``=``, ``==``, ``!=``), set (``in``, ``notin``) and existence (``k``, ``!k``) terms."""
    for term in _split_terms(selector):
        m = re.match(r"^([^\s!=]+)\s+(in|notin)\s+\((.*)\)$", term)
        if m:
            values = {v.strip() for v in m[3].split(",")}
            if (labels.get(m[1]) in values) != (m[2] == "in") or (m[2] == "in" and m[1] not in labels):
                return False
            continue
        m = re.match(r"^([^\s!=]+)\s*(==|=|!=)\s*(.*)$", term)
        if m:
            if (labels.get(m[1]) == m[3]) != (m[2] != "!="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_match(selector: str, obj: dict[str, Any]) -> bool:
    for term in _split_terms(selector):
        path, op, value = re.match(r"^([^!=]+)(==|=|!=)(.*)$", term).groups()
        current: Any = obj
        for part in path.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        if (str(current) == value) != (op != "!="):
            return False
    return True


def _container_state(phase: str) -> dict[str, Any]:
    if phase == "Running":
        return {"running": {"startedAt": _NOW}}
    if phase in ("Succeeded", "Failed"):
        ok = phase == "Succeeded"
        return {"terminated": {"exitCode": 0 if ok else 1, "reason": "Completed" if ok else "Error"}}
    return {"waiting": {"reason": "ContainerCreating"}}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


# ----------------------------------------------------------------------------------------------- server
class FakeKube:
    """The fake API server; :meth:`start` it, point a client at :meth:`api_client`, :meth:`stop` it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {p: {} for p in RESOURCES}
        self.logs: dict[tuple[str, str], list[str]] = {}
        self.requests: list[Request] = []
        self.deployments_available = True
        self.deployments_ready_after_reads = 1
        self.crash_log = ["loading reward model", "RuntimeError: model weights not found"]
        self.job_script = JobScript()
        #: (method, plural, status code): the next matching request fails with that code (then is removed)
        self.fail_next: list[tuple[str, str, int]] = []
        #: the next log follow stream breaks off (no final chunk) after this many lines
        self.follow_drop_after: int | None = None
        #: (API group, resource, verb) -> allowed?; None allows everything (no RBAC)
        self.authorizer: Any = None
        #: a deleted object stays visible (being deleted) for this many GETs of it
        self.delete_linger_reads = 0
        self._lingering: dict[tuple[str, str, str], int] = {}
        self._reads: dict[tuple[str, str, str], int] = {}
        self._created_at: dict[tuple[str, str], float] = {}
        self._version = 0
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeKube:
        fake = self

        class Handler(_Handler):
            kube = fake

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, args=(0.02,), name="fake-kube", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def api_client(self) -> client.ApiClient:
        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)

    # ------------------------------------------------------------------ test helpers
    def list(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [copy.deepcopy(o) for (ns, _), o in self.objects[plural].items()
                    if namespace is None or ns == namespace]

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects[plural].get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store ``obj`` as if created by someone else (no request recorded, no controller run)."""
        plural = next(p for p, (_, kind) in RESOURCES.items() if kind == obj["kind"])
        with self.lock:
            return self._store(plural, obj["metadata"].get("namespace", "default"), copy.deepcopy(obj))

    def calls(self, method: str, plural: str, sub: str | None = None) -> list[Request]:
        """The recorded requests with ``method`` on ``plural`` (and subresource ``sub``)."""
        out = []
        for r in self.requests:
            m = _PATH.match(r.path)
            if r.method == method and m and m["plural"] == plural and m["sub"] == sub:
                out.append(r)
        return out

    def add_pod(self, namespace: str, name: str, labels: dict[str, str], phase: str = "Running",
                log: list[str] | None = None, state: dict[str, Any] | None = None, container: str = "pytorch",
                restarts: int = 0) -> None:
        status = {"phase": phase, "containerStatuses": [{
            "name": container, "image": "img", "imageID": "", "ready": phase == "Running", "restartCount": restarts,
            "state": state or _container_state(phase)}]}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
               "spec": {"containers": [{"name": container, "image": "img"}]}, "status": status}
        with self.lock:
            self._store("pods", namespace, pod)
            self.logs[(namespace, name)] = list(log or [])

    def add_event(self, namespace: str, involved: str, reason: str, message: str, type_: str = "Warning") -> None:
        event = {"apiVersion": "v1", "kind": "Event",
                 "metadata": {"name": f"{involved}.{uuid.uuid4().hex[:8]}", "namespace": namespace},
                 "involvedObject": {"kind": "Pod", "name": involved, "namespace": namespace},
                 "reason": reason, "message": message, "type": type_}
        with self.lock:
            self._store("events", namespace, event)

    # ------------------------------------------------------------------ storage
    def _store(self, plural: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        self._version += 1
        meta = obj.setdefault("metadata", {})
        meta.update(namespace=namespace, resourceVersion=str(self._version))
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _NOW)
        meta.setdefault("generation", 1)
        obj.setdefault("apiVersion", RESOURCES[plural][0])
        obj.setdefault("kind", RESOURCES[plural][1])
        self.objects[plural][(namespace, meta["name"])] = obj
        return obj

    def _must_get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        obj = self.objects[plural].get((namespace, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
        return obj

    # ------------------------------------------------------------------ REST verbs (called with the lock held)
    def do_list(self, plural: str, namespace: str, query: dict[str, list[str]]) -> dict[str, Any]:
        labels, fields = query.get("labelSelector", [""])[0], query.get("fieldSelector", [""])[0]
        items = [o for (ns, _), o in self.objects[plural].items() if ns == namespace
                 and (not labels or label_match(labels, o["metadata"].get("labels") or {}))
                 and (not fields or field_match(fields, o))]
        api_version, kind = RESOURCES[plural]
        return {"apiVersion": api_version, "kind": f"{kind}List", "metadata": {"resourceVersion": str(self._version)},
                "items": items}

    def do_get(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        key = (plural, namespace, name)
        if key in self._lingering:
            if self._lingering[key] <= 0:
                del self._lingering[key]
                self.objects[plural].pop((namespace, name), None)
            else:
                self._lingering[key] -= 1
        obj = self._must_get(plural, namespace, name)
        key = (plural, namespace, name)
        self._reads[key] = self._reads.get(key, 0) + 1
        if plural == "deployments":
            self._deployment_controller(obj, self._reads[key])
        elif plural == "pytorchjobs":
            self._job_controller(obj, self._reads[key])
        return obj

    def do_create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("metadata", {}).get("name")
        if (namespace, name) in self.objects[plural]:
            raise ApiError(409, "AlreadyExists", f'{plural} "{name}" already exists')
        body.pop("status", None)
        if plural == "services":
            body["spec"]["clusterIP"] = f"10.96.0.{len(self.objects['services']) + 10}"
        obj = self._store(plural, namespace, body)
        if plural == "pytorchjobs":
            self._job_created(obj)
        elif plural == "deployments" and not self.deployments_available:
            self._crashing_pod(obj)
        return obj

    def do_replace(self, plural: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        current = self._must_get(plural, namespace, name)
        sent = body.get("metadata", {}).get("resourceVersion")
        if sent and sent != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": the object has '
                                            "been modified; please apply your changes to the latest version")
        if plural == "services" and body["spec"].get("clusterIP") != current["spec"]["clusterIP"]:
            raise ApiError(422, "Invalid", f'Service "{name}" is invalid: spec.clusterIP: Invalid value: '
                                           f'"{body["spec"].get("clusterIP", "")}": field is immutable')
        changed = body.get("spec") != current.get("spec")
        body["metadata"].update(uid=current["metadata"]["uid"], generation=current["metadata"]["generation"] + changed)
        if "status" in current:
            body["status"] = current["status"]
        return self._store(plural, namespace, body)

    def do_patch(self, plural: str, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        current = self._must_get(plural, namespace, name)
        if not isinstance(patch, dict):
            raise ApiError(415, "UnsupportedMediaType", "the fake server only understands merge patches")
        patched = merge_patch(current, patch)
        changed = patched.get("spec") != current.get("spec")
        patched["metadata"]["generation"] = current["metadata"]["generation"] + changed
        return self._store(plural, namespace, patched)

    def do_delete(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        obj = self._must_get(plural, namespace, name)
        if self.delete_linger_reads > 0:
            obj["metadata"].setdefault("deletionTimestamp", _NOW)
            self._lingering.setdefault((plural, namespace, name), self.delete_linger_reads)
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, "kind": plural, "uid": obj["metadata"]["uid"]}}
        del self.objects[plural][(namespace, name)]
        if plural == "pytorchjobs":  # garbage collection of the job's pods
            for key, pod in list(self.objects["pods"].items()):
                if key[0] == namespace and (pod["metadata"].get("labels") or {}).get(JOB_NAME) == name:
                    del self.objects["pods"][key]
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "kind": plural, "uid": obj["metadata"]["uid"]}}

    # ------------------------------------------------------------------ controllers
    def _deployment_controller(self, dep: dict[str, Any], reads: int) -> None:
        want = dep["spec"].get("replicas", 1)
        ready = self.deployments_available and reads >= self.deployments_ready_after_reads
        dep["status"] = {
            "observedGeneration": dep["metadata"]["generation"], "replicas": want, "updatedReplicas": want,
            "readyReplicas": want if ready else 0, "availableReplicas": want if ready else 0,
            "conditions": [{"type": "Available", "status": "True" if ready else "False",
                            "reason": "MinimumReplicasAvailable" if ready else "MinimumReplicasUnavailable",
                            "message": "Deployment has minimum availability." if ready else
                            "Deployment does not have minimum availability."}],
        }

    def _crashing_pod(self, dep: dict[str, Any]) -> None:
        ns, name = dep["metadata"]["namespace"], f"{dep['metadata']['name']}-5d8f7-x2x4q"
        container = dep["spec"]["template"]["spec"]["containers"][0]["name"]
        self.add_pod(ns, name, dict(dep["spec"]["template"]["metadata"]["labels"]), phase="Running",
                     log=self.crash_log, container=container, restarts=4,
                     state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}})
        self.add_event(ns, name, "BackOff", "Back-off restarting failed container")

    def _job_created(self, job: dict[str, Any]) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        self._created_at[(ns, name)] = time.monotonic()
        created = self._condition("Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")
        job["status"] = {"conditions": [created]}
        specs = job["spec"]["pytorchReplicaSpecs"]
        replicas = [("master", self.job_script.master_replica_type, 0)]
        replicas += [("worker", "worker", i) for i in range(specs.get("Worker", {}).get("replicas", 0))]
        for role, type_label, index in replicas:
            labels = {JOB_NAME: name, REPLICA_TYPE: type_label, "training.kubeflow.org/replica-index": str(index),
                      **(job["spec"]["pytorchReplicaSpecs"]["Master" if role == "master" else "Worker"]
                         ["template"].get("metadata", {}).get("labels") or {})}
            if role == "master":
                labels["training.kubeflow.org/job-role"] = "master"
            self.add_pod(ns, f"{name}-{role}-{index}", labels, phase="Pending")

    def _job_pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        return [p for (pns, _), p in self.objects["pods"].items()
                if pns == ns and (p["metadata"].get("labels") or {}).get(JOB_NAME) == name]

    def _job_controller(self, job: dict[str, Any], reads: int) -> None:
        script, ns = self.job_script, job["metadata"]["namespace"]
        conditions = job.setdefault("status", {}).setdefault("conditions", [])
        types = {c["type"] for c in conditions if c["status"] == "True"}
        if types & {"Succeeded", "Failed"}:
            return
        if "Running" not in types:
            conditions.append(self._condition("Running", "PyTorchJobRunning", "PyTorchJob is running."))
            for pod in self._job_pods(job):
                self._set_pod(pod, "Running")
                lines = script.master_log if "master" in pod["metadata"]["name"] else script.worker_log
                self.logs[(ns, pod["metadata"]["name"])] = list(lines[:-1])
        elapsed = time.monotonic() - self._created_at.get((ns, job["metadata"]["name"]), time.monotonic())
        due = (script.after_reads is not None and reads >= script.after_reads) or \
              (script.after_s is not None and elapsed >= script.after_s)
        if script.outcome == "Running" or not due:
            return
        for c in conditions:
            if c["type"] == "Running":
                c["status"] = "False"
        conditions.append(self._condition(script.outcome, script.reason or f"PyTorchJob{script.outcome}",
                                          script.message or f"PyTorchJob {job['metadata']['name']} is "
                                                            f"{script.outcome.lower()}."))
        for pod in self._job_pods(job):
            is_master = "master" in pod["metadata"]["name"]
            failed = script.outcome == "Failed" and (script.failed_replica == "master") == is_master
            self._set_pod(pod, "Failed" if failed else "Succeeded")
            self.logs[(ns, pod["metadata"]["name"])] = list(script.master_log if is_master else script.worker_log)

    @staticmethod
    def _condition(type_: str, reason: str, message: str) -> dict[str, Any]:
        return {"type": type_, "status": "True", "reason": reason, "message": message,
                "lastUpdateTime": _NOW, "lastTransitionTime": _NOW}

    def _set_pod(self, pod: dict[str, Any], phase: str) -> None:
        cs = pod["status"]["containerStatuses"][0]
        pod["status"]["phase"] = phase
        cs["ready"] = phase == "Running"
        cs["state"] = _container_state(phase)
        self._store("pods", pod["metadata"]["namespace"], pod)

    # ------------------------------------------------------------------ logs
    def log_snapshot(self, namespace: str, name: str, instance: int | None = None) -> tuple[list[str], bool, int]:
        """The pod's log so far, whether it has ended (the container terminated or restarted since
        ``instance``, the pod is gone, or the server is stopping), and the container's restart count."""
        with self.lock:
            pod = self.objects["pods"].get((namespace, name))
            if pod is None:
                return [], True, -1
            status = pod["status"]["containerStatuses"][0]
            ended = self._stopping.is_set() or "terminated" in status["state"] or \
                (instance is not None and instance != status["restartCount"])
            return list(self.logs.get((namespace, name), [])), ended, status["restartCount"]

    def restart_container(self, namespace: str, name: str, log: list[str]) -> None:
        """The pod's container crashed and the kubelet started it again (restartPolicy OnFailure): the
        restart count goes up and the new instance's log starts as ``log``."""
        with self.lock:
            pod = self._must_get("pods", namespace, name)
            pod["status"]["containerStatuses"][0]["restartCount"] += 1
            self.logs[(namespace, name)] = list(log)
            self._store("pods", namespace, pod)


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        kube = self.kube
        request = Request(method, url.path, query, copy.deepcopy(body))
        with kube.lock:
            kube.requests.append(request)
        m = _PATH.match(url.path)
        try:
            attributes = rbac_attributes(request)
            if kube.authorizer is not None and attributes and not kube.authorizer(*attributes):
                group, resource, verb = attributes
                raise ApiError(403, "Forbidden", f'{resource} is forbidden: User "system:serviceaccount:'
                                                 f'{m["ns"]}:flowgrpo-pipeline-runner" cannot {verb} resource '
                                                 f'"{resource}" in API group "{group}" in the namespace "{m["ns"]}"')
            if not m or m["plural"] not in RESOURCES:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({url.path})")
            group_version = m["core"] or f"{m['group']}/{m['version']}"
            if group_version != RESOURCES[m["plural"]][0]:
                raise ApiError(404, "NotFound", f"no {m['plural']} in {group_version}")
            ns, plural, name, sub = m["ns"], m["plural"], m["name"], m["sub"]
            with kube.lock:
                injected = next((f for f in kube.fail_next if f[:2] == (method, plural)), None)
                if injected:
                    kube.fail_next.remove(injected)
            if injected:
                raise ApiError(injected[2], "Injected", f"injected failure of {method} {url.path}")
            if sub == "log":
                return self._log(ns, name, query)
            with kube.lock:
                if method == "GET" and name is None:
                    result = kube.do_list(plural, ns, query)
                elif method == "GET":
                    result = kube.do_get(plural, ns, name)
                elif method == "POST" and name is None:
                    result = kube.do_create(plural, ns, body)
                elif method == "PUT" and name:
                    result = kube.do_replace(plural, ns, name, body)
                elif method == "PATCH" and name:
                    result = kube.do_patch(plural, ns, name, body)
                elif method == "DELETE" and name:
                    result = kube.do_delete(plural, ns, name)
                else:
                    raise ApiError(405, "MethodNotAllowed", f"{method} {url.path} is not supported")
                payload = json.dumps(result)
            self._send(201 if method == "POST" else 200, payload.encode(), "application/json")
        except ApiError as e:
            self._send(e.code, json.dumps(e.status()).encode(), "application/json")

    def _send(self, code: int, payload: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True

    def _log(self, ns: str, name: str, query: dict[str, list[str]]) -> None:
        kube = self.kube
        with kube.lock:
            pod = kube._must_get("pods", ns, name)
            status = pod["status"]["containerStatuses"][0]
            state = status["state"]
        if "waiting" in state and not status["restartCount"]:  # else the kubelet serves the last instance's log
            raise ApiError(400, "BadRequest", f'container "{status["name"]}" in pod "{name}" is waiting to start: '
                                              f'{state["waiting"].get("reason", "")}')
        lines, _, instance = kube.log_snapshot(ns, name)
        if query.get("follow", ["false"])[0] != "true":
            if "tailLines" in query:
                lines = lines[-int(query["tailLines"][0]):]
            return self._send(200, "".join(f"{line}\n" for line in lines).encode(), "text/plain")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent, ended, drop_after = 0, False, kube.follow_drop_after
        kube.follow_drop_after = None
        try:
            while not ended:
                lines, ended, now = kube.log_snapshot(ns, name, instance)
                if now != instance:
                    break  # this instance of the container is gone; its successor has its own stream
                for line in lines[sent:]:
                    if drop_after is not None and sent >= drop_after:
                        self.connection.shutdown(socket.SHUT_RDWR)  # a dropped connection: no final chunk
                        return
                    data = f"{line}\n".encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                    sent += 1
                if not ended:
                    time.sleep(0.01)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped following
