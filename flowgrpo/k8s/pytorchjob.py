"""The training launcher: create a Kubeflow PyTorchJob, stream its master's log, wait for ``Succeeded``.

What the public launchers get wrong and this one does not (orchestration.md §3):

* Only the ``Succeeded`` condition is success. Waiting for {Succeeded, Failed} and returning ends the KFP
  task green on a failed training (the ilab / kfp pytorch-launcher bug). ``Failed`` raises
  :class:`TrainingFailed` with the reason and the master's last log lines.
* A retried task adopts the job its previous try created (same name, same run-id label) instead of starting
  a second training; only a job that already ``Failed`` is deleted and created again (the trainer resumes
  from its latest checkpoint).
* The local timeout deletes the job, and so does SIGTERM (KFP terminate), so cancelling the pipeline does
  not leave GPUs busy. ``runPolicy.activeDeadlineSeconds`` / ``ttlSecondsAfterFinished`` back this up
  server-side when the launcher is killed outright.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Iterator

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from flowgrpo.backends.base import RUN_ID_LABEL, BackendError, TrainingFailed, TrainJobSpec
from flowgrpo.k8s.client import api_error
from flowgrpo.k8s.objects import (
    PYTORCHJOB_GROUP,
    PYTORCHJOB_PLURAL,
    PYTORCHJOB_VERSION,
    TRAINER_CONTAINER,
    pytorchjob,
    run_label,
)
from flowgrpo.k8s.validate import DEFAULT_K8S_VERSION, validate_object

Log = Callable[[str], Any]

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
#: training-operator 1.x labels the master ``master``; older operators wrote the replica type as ``Master``
MASTER_TYPES = ("master", "Master")
LOG_TAIL_LINES = 50
_WORKER_TAIL_LINES = 20
_MAX_API_ERRORS = 5  # consecutive failed status reads (API server restarts, network) before giving up
_GONE_TIMEOUT_S = 300.0  # deleting a Failed job before re-creating it: finalizers may take a while
_DRAIN_S = 10.0  # after the job ends, how long the log stream may take to deliver its last lines


def run_job(job: TrainJobSpec, run_id: str, namespace: str, api: client.ApiClient, poll_s: float = 10.0,
            log: Log = print, k8s_version: str = DEFAULT_K8S_VERSION) -> dict[str, Any]:
    """Run ``job`` as a PyTorchJob and block until it has ``Succeeded``.

    Returns {"job": name, "wall_s": seconds, "conditions": the job's final conditions}. Raises
    :class:`TrainingFailed` on ``Failed`` or after ``job.timeout_s`` (then the job is deleted), and
    :class:`BackendError` when the job cannot be created or the API server stays unreachable.
    """
    body = pytorchjob(job, run_id, namespace)
    validate_object(body, k8s_version)
    jobs = _Jobs(client.CustomObjectsApi(api), namespace)
    core = client.CoreV1Api(api)
    start = time.monotonic()
    with _delete_on_sigterm(sigterm_handler(job.name, namespace, api, log)):
        _create_or_adopt(jobs, body, run_id, poll_s, log)
        follower = MasterLogFollower(core, job.name, namespace, log, poll_s)
        follower.start()
        try:
            state, conditions = _wait_for_end(jobs, job, start + job.timeout_s, poll_s, log)
        except BaseException:
            follower.stop()
            raise
        if state == "Timeout":
            follower.stop()
        else:  # the master has ended or is ending: let its last lines arrive
            follower.finish(_DRAIN_S)
        if state == "Succeeded":
            wall_s = time.monotonic() - start
            log(f"PyTorchJob {namespace}/{job.name} succeeded after {wall_s:.0f}s")
            return {"job": job.name, "wall_s": wall_s, "conditions": conditions}
        tail = _master_log_tail(core, job.name, namespace, follower.tail())
        if state == "Timeout":
            jobs.delete(job.name)
        raise TrainingFailed(_why(state, conditions, job, namespace, core), tail)


def _why(state: str, conditions: list[dict[str, Any]], job: TrainJobSpec, namespace: str,
         core: client.CoreV1Api) -> str:
    """What went wrong: the Failed condition's reason and message plus the failed workers' logs, or the
    timeout with the last condition reached."""
    where = f"PyTorchJob {namespace}/{job.name}"
    if state == "Failed":
        failed = next(c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True")
        lines = [f"{where} failed: {failed.get('reason', '?')}: {failed.get('message', '')}".rstrip()]
        return "\n".join(lines + _failed_worker_logs(core, job.name, namespace))
    last = next((c.get("type") for c in reversed(conditions) if c.get("status") == "True"), "no condition")
    return (f"{where} did not succeed within timeout_s={job.timeout_s:g}s (last condition: {last}); "
            "the job was deleted")


class _Jobs:
    """PyTorchJob calls of one namespace (the custom-objects API wants group/version/plural every time)."""

    def __init__(self, custom: client.CustomObjectsApi, namespace: str):
        self.custom, self.namespace = custom, namespace
        self._where = (PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace, PYTORCHJOB_PLURAL)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(*self._where, body)

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(*self._where, name)

    def delete(self, name: str) -> bool:
        """Delete ``name`` with its pods; False if it was already gone."""
        try:
            self.custom.delete_namespaced_custom_object(*self._where, name, propagation_policy="Background")
        except ApiException as e:
            if e.status == 404:
                return False
            raise BackendError(f"deleting PyTorchJob {self.namespace}/{name} failed: {api_error(e)}") from e
        return True


def _true_types(conditions: list[dict[str, Any]]) -> set[str]:
    return {c.get("type", "") for c in conditions if c.get("status") == "True"}


def _end_state(conditions: list[dict[str, Any]]) -> str | None:
    """``Failed`` or ``Succeeded`` once the operator says so; Failed wins should both ever be true."""
    true = _true_types(conditions)
    return "Failed" if "Failed" in true else "Succeeded" if "Succeeded" in true else None


def _create_or_adopt(jobs: _Jobs, body: dict[str, Any], run_id: str, poll_s: float, log: Log) -> None:
    name, where = body["metadata"]["name"], f"PyTorchJob {jobs.namespace}/{body['metadata']['name']}"
    try:
        jobs.create(body)
        log(f"created {where}")
        return
    except ApiException as e:
        if e.status != 409:
            raise BackendError(f"creating {where} failed: {api_error(e)}") from e
    existing = jobs.get(name)
    owner = ((existing.get("metadata") or {}).get("labels") or {}).get(RUN_ID_LABEL)
    if owner != run_label(run_id):
        raise BackendError(f"{where} already exists and belongs to run {owner!r}, not {run_label(run_id)!r}: "
                           f"delete it (kubectl delete pytorchjob -n {jobs.namespace} {name}) or name the job "
                           "after this run")
    if _end_state((existing.get("status") or {}).get("conditions") or []) != "Failed":
        log(f"adopting {where}, created by an earlier try of this run (not starting a second training)")
        return
    log(f"{where} from an earlier try of this run has Failed: deleting it and starting again")
    jobs.delete(name)
    deadline = time.monotonic() + _GONE_TIMEOUT_S
    while True:
        try:
            jobs.get(name)
        except ApiException as e:
            if e.status == 404:
                break
            raise BackendError(f"reading {where} failed: {api_error(e)}") from e
        if time.monotonic() >= deadline:
            raise BackendError(f"{where} was deleted but is still there after {_GONE_TIMEOUT_S:g}s "
                               "(a stuck finalizer?); remove it by hand and retry")
        time.sleep(poll_s)
    jobs.create(body)
    log(f"created {where}")


def _wait_for_end(jobs: _Jobs, job: TrainJobSpec, deadline: float, poll_s: float,
                  log: Log) -> tuple[str, list[dict[str, Any]]]:
    """Poll the job's conditions until Succeeded / Failed, or ``"Timeout"`` at ``deadline``; logs each
    condition as it turns true. Transient API errors are retried, a vanished job is a failure."""
    where = f"PyTorchJob {jobs.namespace}/{job.name}"
    seen: set[tuple[str, str]] = set()
    conditions: list[dict[str, Any]] = []
    errors = 0
    while True:
        try:
            obj = jobs.get(job.name)
            errors = 0
            conditions = (obj.get("status") or {}).get("conditions") or []
        except ApiException as e:
            if e.status == 404:
                raise TrainingFailed(f"{where} disappeared while running (deleted by someone else, or its "
                                     "ttlSecondsAfterFinished ran out)") from e
            if e.status < 500 and e.status != 429:
                raise BackendError(f"reading {where} failed: {api_error(e)}") from e
            errors += 1
            error = api_error(e)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            errors += 1
            error = str(e)
        if errors > _MAX_API_ERRORS:
            raise BackendError(f"reading {where} failed {errors} times in a row, last: {error}")
        for c in conditions:
            key = (c.get("type", ""), c.get("reason", ""))
            if c.get("status") == "True" and key not in seen:
                seen.add(key)
                log(f"{where}: {c.get('type')} ({c.get('reason', '')}) {c.get('message', '')}".rstrip())
        state = _end_state(conditions)
        if state:
            return state, conditions
        now = time.monotonic()
        if now >= deadline:
            return "Timeout", conditions
        time.sleep(min(poll_s, deadline - now))


# ------------------------------------------------------------------------------------------ SIGTERM
def sigterm_handler(job_name: str, namespace: str, api: client.ApiClient,
                    log: Log = print) -> Callable[[int, FrameType | None], None]:
    """The handler run on SIGTERM (KFP terminate, pod eviction): delete the job, then exit ``128 + signum``.

    Without it the launcher pod dies and the PyTorchJob trains on until its activeDeadlineSeconds.
    """
    jobs = _Jobs(client.CustomObjectsApi(api), namespace)

    def handler(signum: int, frame: FrameType | None) -> None:
        log(f"signal {signum}: deleting PyTorchJob {namespace}/{job_name} so that no training outlives this task")
        try:
            jobs.delete(job_name)
        except (BackendError, urllib3.exceptions.HTTPError, OSError) as e:
            log(f"could not delete PyTorchJob {namespace}/{job_name}: {e}; delete it by hand")
        raise SystemExit(128 + signum)

    return handler


@contextmanager
def _delete_on_sigterm(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Install ``handler`` for SIGTERM while the job runs, then restore the previous one. Python only lets
    the main thread set handlers; elsewhere (a thread pool) this is a no-op and the server-side deadlines
    are the backstop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------------------------- logs
def _master_pods(core: client.CoreV1Api, job_name: str, namespace: str) -> list[Any]:
    """The job's master pods, newest first."""
    selector = f"{JOB_NAME_LABEL}={job_name},{REPLICA_TYPE_LABEL} in ({','.join(MASTER_TYPES)})"
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    return sorted(pods, key=lambda p: str(p.metadata.creation_timestamp or ""), reverse=True)


def _lines(response: Any) -> Iterator[str]:
    """Lines of a streamed (chunked) HTTP body as they arrive; a last line without newline included."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk if isinstance(chunk, bytes) else chunk.encode()
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", errors="replace").rstrip("\r")
    if buffer:
        yield buffer.decode("utf-8", errors="replace")


class MasterLogFollower(threading.Thread):
    """Streams the master pod's ``pytorch`` container log (``follow=True``) to ``log``, line by line.

    A daemon thread, so a blocked read never keeps the process alive. It survives the things that happen to
    a long training: the pod not existing or not started yet, container restarts (``OnFailure``: each
    instance, keyed by pod uid and restart count, is streamed once) and dropped connections (it reconnects
    and skips the lines it already emitted). The last ``keep_lines`` lines stay readable through
    :meth:`tail`, since the pod may be gone (cleanPodPolicy) when the failure is reported.
    """

    def __init__(self, core: client.CoreV1Api, job_name: str, namespace: str, log: Log, poll_s: float,
                 keep_lines: int = LOG_TAIL_LINES):
        super().__init__(name=f"logs-{job_name}", daemon=True)
        self._core, self._job, self._namespace, self._log, self._poll_s = core, job_name, namespace, log, poll_s
        self._tail: deque[str] = deque(maxlen=keep_lines)
        self._emitted: dict[tuple[str, int], int] = {}
        self._complete: set[tuple[str, int]] = set()
        self._stopping, self._draining = threading.Event(), threading.Event()
        self._response: Any = None
        self._lock = threading.Lock()
        self._last_error = ""

    def tail(self) -> list[str]:
        return list(self._tail)

    def finish(self, drain_s: float) -> None:
        """Let the stream deliver what is left of a finished master's log (at most ``drain_s``), then stop."""
        self._draining.set()
        self.join(drain_s)
        self.stop()

    def stop(self) -> None:
        """Stop now, unblocking a read in progress."""
        self._stopping.set()
        with self._lock:  # held while shutting down, so the reader cannot release the connection meanwhile
            if self._response is None:
                return
            try:
                getattr(self._response, "shutdown", self._response.close)()
            except (OSError, ValueError, RuntimeError):
                pass  # the stream had already ended and its socket was closed or pooled: nothing to unblock

    def run(self) -> None:
        while not self._stopping.is_set():
            instance = self._master_instance()
            if instance is None or instance[1] in self._complete:
                if self._draining.is_set():
                    return
                self._stopping.wait(self._poll_s)
                continue
            pod_name, key, running = instance
            self._stream(pod_name, key)
            if running:  # the stream ended with the container still running: look again before reconnecting
                self._stopping.wait(min(self._poll_s, 1.0))
            else:  # it had terminated before the stream began, so the stream held its whole log
                self._complete.add(key)

    def _master_instance(self) -> tuple[str, tuple[str, int], bool] | None:
        """(pod name, (pod uid, restart count), running?) of the master's started container, or None."""
        try:
            pods = _master_pods(self._core, self._job, self._namespace)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            self._note(f"cannot list the master pod of PyTorchJob {self._namespace}/{self._job}: {e}")
            return None
        for pod in pods:
            for cs in (pod.status.container_statuses or []) if pod.status else []:
                if cs.name == TRAINER_CONTAINER and cs.state and (cs.state.running or cs.state.terminated):
                    return pod.metadata.name, (pod.metadata.uid or pod.metadata.name, cs.restart_count or 0), \
                        bool(cs.state.running)
        return None

    def _stream(self, pod_name: str, key: tuple[str, int]) -> None:
        skip = self._emitted.get(key, 0)
        try:
            response = self._core.read_namespaced_pod_log(pod_name, self._namespace, container=TRAINER_CONTAINER,
                                                          follow=True, _preload_content=False)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            self._note(f"cannot read the log of pod {pod_name}: {e}")
            self._stopping.wait(self._poll_s)
            return
        with self._lock:
            self._response = response
        try:
            for line in _lines(response):
                if self._stopping.is_set():
                    return
                if skip:
                    skip -= 1
                    continue
                self._emitted[key] = self._emitted.get(key, 0) + 1
                self._tail.append(line)
                self._log(f"[{pod_name}] {line}")
        except Exception as e:  # noqa: BLE001 - any broken stream means "reconnect", unless we are stopping
            if not self._stopping.is_set():
                self._note(f"log stream of pod {pod_name} broke ({e!r}); reconnecting")
        finally:
            with self._lock:
                self._response = None
                response.release_conn()

    def _note(self, message: str) -> None:
        """Log a problem once, not on every poll."""
        if message != self._last_error:
            self._last_error = message
            self._log(message)


def _master_log_tail(core: client.CoreV1Api, job_name: str, namespace: str, streamed: list[str]) -> str:
    """The master's last lines as the API server has them, else those the follower saw (the pod may have
    been removed by cleanPodPolicy already)."""
    try:
        pods = _master_pods(core, job_name, namespace)
        if pods:
            text = core.read_namespaced_pod_log(pods[0].metadata.name, namespace, container=TRAINER_CONTAINER,
                                                tail_lines=LOG_TAIL_LINES)
            if text and text.strip():
                return text.rstrip("\n")
    except (ApiException, urllib3.exceptions.HTTPError, OSError):
        pass
    return "\n".join(streamed)


def _failed_worker_logs(core: client.CoreV1Api, job_name: str, namespace: str) -> list[str]:
    """For each failed non-master pod: its exit state and last lines (a crashed worker often leaves the
    master with nothing but a collective timeout)."""
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={job_name}").items
    except (ApiException, urllib3.exceptions.HTTPError, OSError):
        return []
    lines = []
    for pod in pods:
        if (pod.metadata.labels or {}).get(REPLICA_TYPE_LABEL) in MASTER_TYPES:
            continue
        how = _failure(pod)
        if how is None:
            continue
        lines.append(f"--- pod {pod.metadata.name} failed ({how}); its last lines ---")
        try:
            text = core.read_namespaced_pod_log(pod.metadata.name, namespace, container=TRAINER_CONTAINER,
                                                tail_lines=_WORKER_TAIL_LINES)
            lines += (text or "").rstrip("\n").splitlines()
        except (ApiException, urllib3.exceptions.HTTPError, OSError):
            lines.append("(log not readable)")
    return lines


def _failure(pod: Any) -> str | None:
    """How the pod's trainer failed ("exit 1, Error"), or None if it did not."""
    status = pod.status
    for cs in (status.container_statuses or []) if status else []:
        ended = cs.state.terminated if cs.name == TRAINER_CONTAINER and cs.state else None
        if ended and ended.exit_code:
            return f"exit {ended.exit_code}, {ended.reason}"
    return "phase Failed" if status and status.phase == "Failed" else None
