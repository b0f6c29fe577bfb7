"""The model registry on the embedded sqlite store: idempotent registration per KFP run, the candidate
alias, the promotion gate (primary metric + guarded gold metrics), rollback, and the CLI."""

from __future__ import annotations

import json

import pytest

from flowgrpo import registry as reg
from flowgrpo.cli import main
from flowgrpo.registry import Gate, GateError, Guard, RegistryError

MODEL = "flowgrpo-sd3"
GATE = {"metric": "geneval_overall", "min_improvement": 0.005, "guards": {"drawbench_aesthetic": 0.05}}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The embedded default store under a fresh FLOWGRPO_HOME (no URI configured anywhere)."""
    monkeypatch.setenv("FLOWGRPO_HOME", str(tmp_path / "home"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def _run_with_lineage(store) -> str:
    from mlflow import MlflowClient

    from flowgrpo.tracking import check_tracking, embedded_tracking_uri

    uri = embedded_tracking_uri()
    exp = check_tracking(uri, "flowgrpo")
    c = MlflowClient(tracking_uri=uri)
    run = c.create_run(exp, tags={"kfp.run_id": "kfp-a", "git.sha": "abc123", "image.digest": "sha256:d1",
                                  "base_model.id": "stabilityai/stable-diffusion-3.5-medium",
                                  "base_model.revision": "r1", "final_uri": "s3://models/a/final",
                                  "unrelated": "x"})
    return run.info.run_id


def _register(kfp_id: str, geneval: float, aesthetic: float | None = 5.0, run_id: str | None = None) -> str:
    metrics = {"geneval_overall": geneval}
    if aesthetic is not None:
        metrics["drawbench_aesthetic"] = aesthetic
    return reg.register(MODEL, f"s3://models/{kfp_id}/final", run_id, kfp_run_id=kfp_id, metrics=metrics)


def _champion() -> str | None:
    return reg.show(MODEL)["aliases"].get("champion")


def test_register_is_idempotent_per_kfp_run_and_moves_candidate(store):
    run_id = _run_with_lineage(store)
    v1 = reg.register(MODEL, "s3://models/a/final", run_id, metrics={"geneval_overall": 0.61})
    again = reg.register(MODEL, "s3://models/a/final", run_id, metrics={"geneval_overall": 0.62})  # retried task
    assert v1 == again == "1"
    info = reg.show(MODEL)
    assert [v["version"] for v in info["versions"]] == ["1"] and info["aliases"] == {"candidate": "1"}
    v = info["versions"][0]
    assert v["source"] == "s3://models/a/final" and v["run_id"] == run_id
    assert v["lineage"] == {"kfp.run_id": "kfp-a", "git.sha": "abc123", "image.digest": "sha256:d1",
                            "base_model.id": "stabilityai/stable-diffusion-3.5-medium", "base_model.revision": "r1",
                            "final_uri": "s3://models/a/final"}
    assert v["metrics"] == {"geneval_overall": 0.62}  # the retry's metrics win
    v2 = _register("kfp-b", 0.7)
    assert v2 == "2" and reg.show(MODEL)["aliases"] == {"candidate": "2"}
    assert (store / "mlflow.db").is_file()


def test_gate_refuses_worse_accepts_better_and_guards_gold_metrics(store):
    gate = Gate.from_dict(GATE)
    v1 = _register("k1", 0.60)
    first = reg.promote(MODEL, v1, gate)
    assert first.promoted and first.previous_champion is None and _champion() == v1

    worse = reg.promote(MODEL, _register("k2", 0.603), gate)  # +0.003 < 0.005
    assert not worse.promoted and _champion() == v1
    assert any("improvement +0.003" in r and "< required 0.005" in r for r in worse.reasons), worse.reasons

    gold_drop = reg.promote(MODEL, _register("k3", 0.70, aesthetic=4.9), gate)  # aesthetic drops 0.1 > 0.05
    assert not gold_drop.promoted and _champion() == v1
    assert any(r.startswith("guard drawbench_aesthetic") and "> allowed 0.05" in r for r in gold_drop.reasons)

    missing_gold = reg.promote(MODEL, _register("k4", 0.70, aesthetic=None), gate)
    assert not missing_gold.promoted and _champion() == v1

    v5 = _register("k5", 0.70, aesthetic=4.97)  # small allowed drop
    better = reg.promote(MODEL, v5, gate)
    assert better.promoted and better.previous_champion == v1 and better.champion == v5 and _champion() == v5
    assert reg.promote(MODEL, v5, gate).promoted  # already champion: idempotent, nothing moves

    no_metric = reg.promote(MODEL, reg.register(MODEL, "s3://models/k6", None, kfp_run_id="k6"), gate)
    assert not no_metric.promoted and "no metric.geneval_overall" in no_metric.reasons[0]
    dry = reg.promote(MODEL, _register("k7", 0.9), gate, dry_run=True)
    assert not dry.promoted and _champion() == v5


def test_lower_is_better_and_gate_validation(tmp_path):
    g = Gate.from_dict({"metric": "fid", "higher_is_better": False, "min_improvement": 1.0,
                        "guards": {"clip": {"max_drop": 0.01}, "latency": {"max_drop": 5, "higher_is_better": False}}})
    assert g.guards["clip"] == Guard(0.01) and g.guards["latency"] == Guard(5.0, False)
    assert g.evaluate({"fid": 10.0, "clip": 0.3, "latency": 50}, {"fid": 12.0, "clip": 0.3, "latency": 48})[0]
    assert not g.evaluate({"fid": 11.5, "clip": 0.3}, {"fid": 12.0, "clip": 0.3})[0]  # improved 0.5 < 1
    assert not g.evaluate({"fid": 10.0, "clip": 0.3, "latency": 60}, {"fid": 12.0, "clip": 0.3, "latency": 48})[0]
    assert g.evaluate({"fid": 10.0, "clip": 0.3}, None)[0]  # no champion: the metric is enough
    f = tmp_path / "gate.yaml"
    f.write_text("metric: geneval_overall\nmin_improvement: 5e-3\nguards:\n  drawbench_aesthetic: 0.05\n")
    assert Gate.from_yaml(f) == Gate("geneval_overall", 0.005, True, {"drawbench_aesthetic": Guard(0.05)})
    for bad, field in [({"min_improvement": 1}, "gate.metric"), ({"metric": "m", "min_improvment": 1}, "min_improvment"),
                       ({"metric": "m", "guards": {"g": -1}}, "gate.guards.g.max_drop"),
                       ({"metric": "m", "guards": {"g": {"drop": 1}}}, "gate.guards.g"),
                       ({"metric": "m", "min_improvement": "lots"}, "gate.min_improvement")]:
        with pytest.raises(GateError, match=field.replace(".", r"\.")):
            Gate.from_dict(bad)


def test_rollback_restores_the_previous_champion(store):
    gate = Gate.from_dict(GATE)
    v1, v2, v3 = _register("r1", 0.5), _register("r2", 0.6), _register("r3", 0.7)
    for v in (v1, v2, v3):
        assert reg.promote(MODEL, v, gate).promoted
    assert reg.show(MODEL)["champion_history"] == [v1, v2]
    assert reg.rollback(MODEL) == {"champion": v2, "replaced": v3} and _champion() == v2
    assert reg.rollback(MODEL) == {"champion": v1, "replaced": v2} and _champion() == v1
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback(MODEL)
    assert _champion() == v1


def test_cli_registry_show_promote_rollback(store, tmp_path, capsys):
    v1, v2 = _register("c1", 0.5), _register("c2", 0.6)
    gate = tmp_path / "gate.yaml"
    gate.write_text(json.dumps(GATE))  # JSON is YAML
    assert main(["registry", "promote", "--model", MODEL, "--version", v1, "--gate", str(gate)]) == 0
    assert main(["registry", "promote", "--model", MODEL, "--version", v2, "--gate", str(gate)]) == 0
    capsys.readouterr()
    assert main(["registry", "show", "--model", MODEL]) == 0
    text = capsys.readouterr().out
    assert f"champion=v{v2}" in text and f"v{v2} [candidate, champion]  s3://models/c2/final" in text
    assert "metric.geneval_overall: 0.6" in text and "kfp.run_id: c1" in text
    assert main(["registry", "rollback", "--model", MODEL]) == 0
    assert json.loads(capsys.readouterr().out) == {"champion": v1, "replaced": v2}
    assert main(["registry", "show", "--model", MODEL, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["aliases"] == {"candidate": v2, "champion": v1}
    worse = _register("c3", 0.4)
    assert main(["registry", "promote", "--model", MODEL, "--version", worse, "--gate", str(gate)]) == 1
    assert json.loads(capsys.readouterr().out)["promoted"] is False
    assert main(["registry", "promote", "--model", MODEL, "--version", "99", "--gate", str(gate)]) == 2
    assert "no version 99" in capsys.readouterr().err
    assert main(["registry", "register", "--model", MODEL, "--source", "s3://models/c5/final", "--kfp-run-id", "c5",
                 "--metric", "geneval_overall=0.8"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == str(int(worse) + 1)


def test_cli_mlflow_ui_prints_the_embedded_store_command(store, capsys):
    assert main(["mlflow-ui", "--port", "5055", "--print-only"]) == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri" in out and f"sqlite:///{store.resolve() / 'mlflow.db'}" in out
    assert "--port 5055" in out
