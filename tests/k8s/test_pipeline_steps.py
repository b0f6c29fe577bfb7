"""The pipeline's steps with backend=kubernetes, against the fake API server through a kubeconfig (the way
a component pod or a laptop finds its cluster): what the train step sends, and what it accepts as success."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes.config import kube_config

from flowgrpo import storage
from flowgrpo.pipeline import steps
from tests.k8s.conftest import NAMESPACE, RUN_ID
from tests.k8s.fake_apiserver import FakeKube


@pytest.fixture
def kubeconfig(kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
           "clusters": [{"name": "fake", "cluster": {"server": kube.url}}],
           "users": [{"name": "u", "user": {"token": "t"}}],
           "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u", "namespace": NAMESPACE}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.setenv("FLOWGRPO_K8S_POLL_S", "0.01")
    monkeypatch.setenv("FLOWGRPO_HOME", str(tmp_path / "home"))
    return path


def _train(tmp_path: Path, **kw):
    return steps.train(backend="kubernetes", run_id=RUN_ID, preset="tiny_cpu", model_uri="s3://models/tiny",
                       reward_endpoints={"jpeg_compressibility": "http://fgrpo-rw-jpeg.team-a.svc.cluster.local:8000"},
                       storage_root=str(tmp_path / "store"), nodes=2, procs=4, image="registry.example/trainer:1",
                       secrets=["flowgrpo-s3"], tracking_uri="", timeout_s=30,
                       tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                       node_selector={"pool": "train"}, log_fn=lambda line: None, **kw)


def test_train_step_sends_the_resolved_job_and_needs_the_published_weights(kube, kubeconfig, tmp_path):
    # the job "succeeds" but nothing was published: Succeeded alone is not success
    with pytest.raises(storage.StorageError):
        _train(tmp_path)
    (job,) = kube.list("pytorchjobs", NAMESPACE)
    spec = job["spec"]
    assert spec["nprocPerNode"] == "4" and spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    pod = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    c = pod["containers"][0]
    config_uri = str(tmp_path / "store" / "runs" / RUN_ID / "config.yaml")
    assert c["command"][-2:] == ["--config", config_uri]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KFP_RUN_ID"] == RUN_ID and env["MLFLOW_RUN_ID"]
    assert {"secretRef": {"name": "flowgrpo-s3"}} in c["envFrom"]
    assert pod["tolerations"][0]["key"] == "gpu" and pod["nodeSelector"] == {"pool": "train"}
    assert job["metadata"]["labels"]["flowgrpo.io/run-id"]

    # the config the pods read: the fetched model, reward servers, storage URIs of this run, tracking
    cfg = yaml.safe_load(Path(config_uri).read_text())
    assert cfg["model"]["path"] == "s3://models/tiny"
    assert cfg["reward_options"]["jpeg_compressibility"]["url"].endswith(":8000")
    assert cfg["storage"]["final_uri"] == str(tmp_path / "store" / "runs" / RUN_ID / "final")
    assert cfg["tracking"]["enabled"] and cfg["output_dir"] == "/tmp/flowgrpo/run"

    # once the trainer has published the weights, the same step (a KFP retry) adopts the run and succeeds
    kube.objects["pytorchjobs"].clear()
    final = tmp_path / "weights"
    final.mkdir()
    (final / "model_index.json").write_text("{}")
    storage.publish_dir(final, cfg["storage"]["final_uri"])
    res = _train(tmp_path)
    assert res["final_uri"] == cfg["storage"]["final_uri"]
    assert res["mlflow_run_id"] == env["MLFLOW_RUN_ID"]  # the retry continues the same MLflow run


def test_failed_job_fails_the_step_with_the_log_tail(kube, kubeconfig, tmp_path):
    kube.job_script.outcome = "Failed"
    kube.job_script.reason = "BackoffLimitExceeded"
    kube.job_script.master_log = ["epoch 3", "RuntimeError: CUDA out of memory"]
    from flowgrpo.backends import TrainingFailed

    with pytest.raises(TrainingFailed) as e:
        _train(tmp_path)
    assert "CUDA out of memory" in str(e.value) and "BackoffLimitExceeded" in str(e.value)
    # teardown (what the pipeline runs next, ignoring the failure) removes the job by its run label
    deleted = steps.teardown("kubernetes", RUN_ID, NAMESPACE)
    assert any(d.startswith("PyTorchJob/") for d in deleted) and kube.list("pytorchjobs") == []
