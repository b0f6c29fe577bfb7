"""The training launcher against the fake training operator: success, failure, timeout, adoption, SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import pytest
from kubernetes import client

from flowgrpo.backends.base import BackendError, TrainingFailed, TrainJobSpec
from flowgrpo.k8s import objects
from flowgrpo.k8s.pytorchjob import MasterLogFollower, run_job, sigterm_handler
from flowgrpo.k8s.validate import ManifestError
from tests.k8s.conftest import NAMESPACE, RUN_ID
from tests.k8s.fake_apiserver import FakeKube, JobScript

POLL_S = 0.02


class Lines(list):
    """A log callback that keeps what it was given (it is called from the follower thread too)."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def index_of(self, text: str) -> int:
        return next(i for i, line in enumerate(self) if text in line)


@pytest.fixture
def lines() -> Lines:
    return Lines()


def when_logged(lines: Lines, text: str, action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` once ``text`` has reached the log callback: it scripts the operator off what the
    launcher has seen, not off timing."""

    def wait_then_act() -> None:
        deadline = time.monotonic() + 5
        while not any(text in line for line in list(lines)) and time.monotonic() < deadline:
            time.sleep(0.005)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def finish(script: JobScript, outcome: str = "Succeeded") -> Callable[[], None]:
    def act() -> None:
        script.outcome, script.after_reads = outcome, 0

    return act


def test_success_streams_the_master_log_while_running(kube: FakeKube, api: client.ApiClient,
                                                      train_job: TrainJobSpec, lines: Lines) -> None:
    kube.job_script = JobScript(outcome="Running")
    when_logged(lines, "step 1 loss", finish(kube.job_script))
    result = run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)

    assert result["job"] == train_job.name and 0 < result["wall_s"] < 5
    assert [c["type"] for c in result["conditions"] if c["status"] == "True"] == ["Created", "Succeeded"]
    master = f"[{train_job.name}-master-0] "
    assert [line for line in lines if line.startswith(master)] == \
        [master + text for text in ("epoch 0 step 1 loss 0.50", "epoch 0 step 2 loss 0.40", "training done")]
    # the first lines arrived while the job was running, not read back after it ended
    assert lines.index_of("step 1 loss") < lines.index_of(": Succeeded")
    assert len(kube.calls("POST", "pytorchjobs")) == 1
    created = kube.calls("POST", "pytorchjobs")[0].body
    assert created["metadata"]["labels"]["flowgrpo.io/run-id"] == RUN_ID
    assert kube.get("pytorchjobs", NAMESPACE, train_job.name) is not None  # success leaves it to its TTL


def test_legacy_master_label_and_multi_node(kube: FakeKube, api: client.ApiClient, lines: Lines) -> None:
    kube.job_script = JobScript(master_replica_type="Master")
    job = TrainJobSpec(name="fgrpo-multi", config_uri="c", nodes=3, procs_per_node=2, image="t:1", timeout_s=10)
    run_job(job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)
    assert "[fgrpo-multi-master-0] training done" in lines
    assert not any("worker" in line and "worker ready" in line for line in lines)  # only the master is streamed
    pods = {p["metadata"]["name"] for p in kube.list("pods", NAMESPACE)}
    assert pods == {"fgrpo-multi-master-0", "fgrpo-multi-worker-0", "fgrpo-multi-worker-1"}


def test_failed_job_raises_with_reason_and_log_tail(kube: FakeKube, api: client.ApiClient,
                                                    train_job: TrainJobSpec, lines: Lines) -> None:
    log = [f"step {i} loss 0.{i:03d}" for i in range(80)] + ["RuntimeError: CUDA error: an illegal memory access"]
    kube.job_script = JobScript(outcome="Failed", after_reads=3, master_log=log, reason="PyTorchJobFailed",
                                message="PyTorchJob fgrpo-3f2a9c1e is failed because 1 Master replica(s) failed.")
    with pytest.raises(TrainingFailed) as err:
        run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)
    message = str(err.value)
    assert f"PyTorchJob {NAMESPACE}/{train_job.name} failed: PyTorchJobFailed: PyTorchJob fgrpo-3f2a9c1e is " \
           "failed because 1 Master replica(s) failed." in message
    assert "RuntimeError: CUDA error: an illegal memory access" in message
    tail = err.value.log_tail.splitlines()
    assert tail == log[-50:]
    assert "step 30 loss" not in message
    assert any("RuntimeError: CUDA error" in line for line in lines)


def test_failed_worker_is_reported_with_its_log(kube: FakeKube, api: client.ApiClient) -> None:
    kube.job_script = JobScript(outcome="Failed", failed_replica="worker",
                                worker_log=["worker up", "NCCL error: unhandled system error"],
                                master_log=["waiting for workers", "Watchdog caught collective operation timeout"])
    job = TrainJobSpec(name="fgrpo-two", config_uri="c", nodes=2, image="t:1", timeout_s=10)
    with pytest.raises(TrainingFailed) as err:
        run_job(job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=Lines())
    message = str(err.value)
    assert "--- pod fgrpo-two-worker-0 failed (exit 1, Error); its last lines ---" in message
    assert "NCCL error: unhandled system error" in message
    assert err.value.log_tail.endswith("Watchdog caught collective operation timeout")


def test_timeout_deletes_the_job(kube: FakeKube, api: client.ApiClient, lines: Lines) -> None:
    kube.job_script = JobScript(outcome="Running")
    job = TrainJobSpec(name="fgrpo-slow", config_uri="c", image="t:1", timeout_s=0.3)
    with pytest.raises(TrainingFailed) as err:
        run_job(job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)
    assert "did not succeed within timeout_s=0.3s (last condition: Running); the job was deleted" in str(err.value)
    assert err.value.log_tail.splitlines() == ["epoch 0 step 1 loss 0.50", "epoch 0 step 2 loss 0.40"]
    assert len(kube.calls("DELETE", "pytorchjobs")) == 1
    assert kube.get("pytorchjobs", NAMESPACE, "fgrpo-slow") is None
    assert kube.list("pods", NAMESPACE) == []


def test_retried_launch_adopts_the_running_job(kube: FakeKube, api: client.ApiClient,
                                               train_job: TrainJobSpec, lines: Lines) -> None:
    """The first try created the job and died; the retry must wait for that job, not start a second one."""
    first_try = objects.pytorchjob(train_job, RUN_ID, NAMESPACE)
    client.CustomObjectsApi(api).create_namespaced_custom_object("kubeflow.org", "v1", NAMESPACE, "pytorchjobs",
                                                                 first_try)
    uid = kube.get("pytorchjobs", NAMESPACE, train_job.name)["metadata"]["uid"]

    result = run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)
    assert result["job"] == train_job.name
    assert any(line.startswith(f"adopting PyTorchJob {NAMESPACE}/{train_job.name}") for line in lines)
    assert kube.get("pytorchjobs", NAMESPACE, train_job.name)["metadata"]["uid"] == uid
    assert len(kube.list("pytorchjobs")) == 1 and not kube.calls("DELETE", "pytorchjobs")
    # and a second retry after success adopts the finished job and returns at once
    assert run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)["job"] == train_job.name
    assert kube.get("pytorchjobs", NAMESPACE, train_job.name)["metadata"]["uid"] == uid


def test_retry_after_a_failed_job_starts_it_again(kube: FakeKube, api: client.ApiClient,
                                                  train_job: TrainJobSpec, lines: Lines) -> None:
    kube.job_script = JobScript(outcome="Failed", after_reads=1)
    with pytest.raises(TrainingFailed):
        run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)
    kube.job_script = JobScript()
    assert run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)["job"] == train_job.name
    assert any("has Failed: deleting it and starting again" in line for line in lines)
    assert len(kube.calls("DELETE", "pytorchjobs")) == 1


def test_a_job_of_another_run_is_not_adopted(kube: FakeKube, api: client.ApiClient,
                                             train_job: TrainJobSpec) -> None:
    kube.put(objects.pytorchjob(train_job, "another-run", NAMESPACE))
    with pytest.raises(BackendError, match="belongs to run 'another-run'"):
        run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=Lines())
    assert kube.get("pytorchjobs", NAMESPACE, train_job.name)["metadata"]["labels"]["flowgrpo.io/run-id"] == \
        "another-run"


def test_transient_api_errors_are_retried_then_fatal(kube: FakeKube, api: client.ApiClient,
                                                     train_job: TrainJobSpec) -> None:
    kube.fail_next = [("GET", "pytorchjobs", 503)] * 3
    assert run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=Lines())["job"] == train_job.name
    kube.job_script = JobScript(outcome="Running")
    kube.fail_next = [("GET", "pytorchjobs", 500)] * 10
    job = TrainJobSpec(name="fgrpo-flaky", config_uri="c", image="t:1", timeout_s=30)
    with pytest.raises(BackendError, match="failed 6 times in a row, last: 500 Internal Server Error"):
        run_job(job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=Lines())


def test_job_deleted_by_someone_else_is_a_failure(kube: FakeKube, api: client.ApiClient,
                                                  train_job: TrainJobSpec) -> None:
    kube.job_script = JobScript(outcome="Running")
    timer = threading.Timer(0.2, lambda: kube.do_delete("pytorchjobs", NAMESPACE, train_job.name))
    timer.start()
    with pytest.raises(TrainingFailed, match="disappeared while running"):
        run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=Lines())
    timer.join()


def test_malformed_job_fails_before_any_request(kube: FakeKube, api: client.ApiClient) -> None:
    job = TrainJobSpec(name="fgrpo-bad", config_uri="c", image="t:1", node_selector={"pool": 1})  # type: ignore
    with pytest.raises(ManifestError, match=r"nodeSelector.pool: 1 is not of type 'string'"):
        run_job(job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=Lines())
    assert kube.requests == []


@pytest.fixture
def sentinel_sigterm() -> Iterator[list[int]]:
    """A SIGTERM handler that records, so a launcher that failed to install its own cannot kill pytest."""
    received: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, record)
    yield received
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_deletes_the_job_and_exits_nonzero(kube: FakeKube, api: client.ApiClient, train_job: TrainJobSpec,
                                                   lines: Lines, sentinel_sigterm: list[int]) -> None:
    kube.job_script = JobScript(outcome="Running")
    killer = when_logged(lines, ": Running", lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as exc:
        run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)
    killer.join()
    assert exc.value.code == 128 + signal.SIGTERM
    assert sentinel_sigterm == []  # our handler ran, not the one from before
    assert kube.get("pytorchjobs", NAMESPACE, train_job.name) is None
    assert any(f"deleting PyTorchJob {NAMESPACE}/{train_job.name}" in line for line in lines)
    # the previous handler is back once run_job returns
    os.kill(os.getpid(), signal.SIGTERM)
    assert sentinel_sigterm == [signal.SIGTERM]


def test_sigterm_handler_called_directly(kube: FakeKube, api: client.ApiClient, train_job: TrainJobSpec) -> None:
    kube.put(objects.pytorchjob(train_job, RUN_ID, NAMESPACE))
    handler = sigterm_handler(train_job.name, NAMESPACE, api, log=Lines())
    with pytest.raises(SystemExit) as exc:
        handler(signal.SIGTERM, None)
    assert exc.value.code == 143 and kube.get("pytorchjobs", NAMESPACE, train_job.name) is None
    with pytest.raises(SystemExit):  # the job already gone is fine
        handler(signal.SIGTERM, None)


def test_off_main_thread_no_handler_is_installed(kube: FakeKube, api: client.ApiClient,
                                                 train_job: TrainJobSpec) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def train() -> None:
        run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lambda line: seen.append(signal.getsignal(
            signal.SIGTERM)))

    worker = threading.Thread(target=train)
    worker.start()
    worker.join(10)
    assert seen and all(h is before for h in seen)


def test_a_dropped_log_stream_reconnects_without_repeating_lines(kube: FakeKube, api: client.ApiClient,
                                                                 train_job: TrainJobSpec, lines: Lines) -> None:
    kube.job_script = JobScript(outcome="Running", master_log=[f"line {i}" for i in range(6)])
    kube.follow_drop_after = 2
    when_logged(lines, "line 4", finish(kube.job_script))
    run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)
    master = [line.split("] ", 1)[1] for line in lines if line.startswith(f"[{train_job.name}-master-0]")]
    assert master == [f"line {i}" for i in range(6)]
    assert len(kube.calls("GET", "pods", sub="log")) >= 2  # it did reconnect


def test_a_restarted_container_is_followed_again(kube: FakeKube, api: client.ApiClient,
                                                 train_job: TrainJobSpec, lines: Lines) -> None:
    """restartPolicy OnFailure: the master crashes, the kubelet restarts it in the same pod, training resumes."""
    kube.job_script = JobScript(outcome="Running", master_log=["attempt 1 step 1", "attempt 1 step 2", "(lost)"])
    master = f"{train_job.name}-master-0"

    def crash_and_resume() -> None:
        kube.restart_container(NAMESPACE, master, ["attempt 2 resumed from checkpoint"])
        kube.job_script.master_log = ["attempt 2 resumed from checkpoint", "training done"]
        kube.job_script.outcome, kube.job_script.after_reads = "Succeeded", 0

    when_logged(lines, "attempt 1 step 2", crash_and_resume)
    run_job(train_job, RUN_ID, NAMESPACE, api, poll_s=POLL_S, log=lines)
    streamed = [line.split("] ", 1)[1] for line in lines if line.startswith(f"[{master}]")]
    assert streamed == ["attempt 1 step 1", "attempt 1 step 2", "attempt 2 resumed from checkpoint", "training done"]


@pytest.mark.parametrize("error", [OSError(9, "Bad file descriptor"), ValueError("no shutdown"),
                                   RuntimeError("released to the pool")])
def test_stop_survives_a_stream_whose_socket_is_already_gone(api: client.ApiClient, error: Exception) -> None:
    """A timeout can race the stream's own end: urllib3 then refuses to shut a closed or pooled socket."""

    class EndedStream:
        shutdowns = 0

        def shutdown(self) -> None:
            self.shutdowns += 1
            raise error

        def close(self) -> None:  # urllib3 responses have both
            raise AssertionError("shutdown is the one to call")

    follower = MasterLogFollower(client.CoreV1Api(api), "fgrpo-x", NAMESPACE, Lines(), POLL_S)
    stream = follower._response = EndedStream()
    follower.stop()  # must not raise
    assert stream.shutdowns == 1 and follower._stopping.is_set()
