"""The committed pipeline YAML is what the code compiles to, and its IR has the DAG we designed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _docs(name: str) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / f"{name}.yaml").read_text()))
    return docs[0], docs[1] if len(docs) > 1 else {}


def test_committed_yaml_is_up_to_date():
    r = subprocess.run([sys.executable, "-m", "flowgrpo.cli", "pipeline", "compile", "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"stale pipelines/*.yaml: run `flowgrpo pipeline compile`\n{r.stdout[-3000:]}{r.stderr[-2000:]}"


def test_compile_check_detects_a_stale_yaml(tmp_path, monkeypatch):
    import shutil

    from flowgrpo.pipeline import cli

    for d in ("pipelines", "components", "configs"):
        shutil.copytree(ROOT / d, tmp_path / d)
    target = tmp_path / "pipelines" / "flow_grpo.yaml"
    target.write_text(target.read_text().replace("maxRetryCount: 3", "maxRetryCount: 9"))
    monkeypatch.setenv("FLOWGRPO_ROOT", str(tmp_path))
    assert cli.package_path("flow_grpo") == target
    assert cli._cmd_compile(type("A", (), {"check": True})()) == 1
    assert cli._cmd_compile(type("A", (), {"check": False})()) == 0
    assert "maxRetryCount: 9" not in target.read_text()


def test_dag_tasks_edges_retries_caching_and_exit_handler():
    spec, _ = _docs("flow_grpo")
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "teardown"}
    exit_task = root["teardown"]
    assert exit_task["dependentTasks"] == ["exit-handler-1"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs on failure too
    assert exit_task["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"

    body = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(body) == {"fetch-model", "deploy-reward", "train", "teardown-2", "evaluate", "condition-2"}
    deps = {k: sorted(v.get("dependentTasks", [])) for k, v in body.items()}
    assert deps["train"] == ["deploy-reward", "fetch-model"]
    assert deps["evaluate"] == ["fetch-model", "train"]
    assert deps["teardown-2"] == ["train"]
    assert body["teardown-2"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # ignore_upstream_failure
    gate = body["condition-2"]
    assert gate["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    inner = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert set(inner) == {"register"}

    retries = {k: v.get("retryPolicy", {}).get("maxRetryCount") for k, v in {**body, **inner}.items()}
    assert retries == {"fetch-model": 2, "deploy-reward": None, "train": None, "teardown-2": None, "evaluate": 2,
                       "condition-2": None, "register": 3}
    cached = {k for k, v in {**body, **inner, **root}.items() if v.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"fetch-model"}  # never deploy / train / register from cache


def test_parameters_have_descriptions_and_typed_defaults():
    from pipelines.flow_grpo import DEFAULTS

    spec, _ = _docs("flow_grpo")
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(DEFAULTS)
    for name, p in params.items():
        assert p.get("description"), f"parameter {name} has no description for the KFP UI"
    assert params["nodes"]["parameterType"] == "NUMBER_INTEGER"
    assert params["tolerations"]["parameterType"] == "LIST"
    assert params["node_selector"]["parameterType"] == "STRUCT"
    assert params["backend"]["defaultValue"] == "kubernetes"


def test_kubernetes_platform_config_secrets_tolerations_node_selector():
    _, platform = _docs("flow_grpo")
    ex = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    fetch = ex["exec-fetch-model"]["secretAsEnv"]
    hf = [s for s in fetch if s["keyToEnv"][0]["envVar"] == "HF_TOKEN"]
    assert hf and hf[0]["secretNameParameter"]["componentInputParameter"] == "pipelinechannel--hf_token_secret"
    for name in ("exec-fetch-model", "exec-train", "exec-evaluate", "exec-register"):
        envs = {e["envVar"] for s in ex[name]["secretAsEnv"] for e in s["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= envs, name
    # the HF token goes to the fetch task only
    others = [s for n, e in ex.items() if n != "exec-fetch-model" for s in e.get("secretAsEnv", [])]
    assert not any(k["envVar"] == "HF_TOKEN" for s in others for k in s["keyToEnv"])
    ev = ex["exec-evaluate"]
    assert ev["tolerations"][0]["tolerationJson"]["componentInputParameter"] == "pipelinechannel--tolerations"
    assert ev["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "pipelinechannel--node_selector"
    # secret values never appear in the IR: only names (as parameters)
    text = (ROOT / "pipelines" / "flow_grpo.yaml").read_text()
    assert "secretName:" not in text


def test_components_do_not_pip_install_at_runtime():
    spec, _ = _docs("flow_grpo")
    for name, ex in spec["deploymentSpec"]["executors"].items():
        cmd = " ".join(ex["container"]["command"])
        assert "pip install" not in cmd, name
        assert ex["container"]["image"].startswith("ghcr.io/flowgrpo/"), name


@pytest.mark.parametrize("name", ["evaluate_model"])
def test_evaluate_only_pipeline(name):
    spec, platform = _docs(name)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"resolve-version", "evaluate", "record-eval"}
    assert sorted(tasks["record-eval"]["dependentTasks"]) == ["evaluate", "resolve-version"]
    assert "exec-evaluate" in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
