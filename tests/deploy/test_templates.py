"""The run templates in manifests/base/templates are what flowgrpo/k8s/objects.py generates (labels, probes,
security context, ports, container names: everything), the prod overlay only adds GPU placement to them,
and the static NetworkPolicy of manifests/base fits the labels the code puts on its pods."""

from __future__ import annotations

import copy
import importlib.util
import sys
from types import ModuleType
from typing import Any

import pytest

from flowgrpo.k8s import objects
from tests.deploy.conftest import MANIFESTS, load_yaml, name_of, pod_template, rendered


def _generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("manifests_generate", MANIFESTS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


GEN = _generate()


def _by_name(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name_of(d): d for d in docs}


def _code_objects() -> dict[str, dict[str, Any]]:
    return _by_name([d for docs in GEN.documents().values() for d in docs])


def _template_objects() -> dict[str, dict[str, Any]]:
    return _by_name([d for name in GEN.documents() for d in load_yaml(MANIFESTS / "base" / "templates" / name)])


def test_templates_are_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert GEN.main(["--check"]) == 0, capsys.readouterr().err


def test_templates_equal_the_code_objects() -> None:
    code, templates = _code_objects(), _template_objects()
    assert set(code) == set(templates) and len(code) == 4  # NetworkPolicy, Deployment, Service, PyTorchJob
    for name, obj in code.items():
        assert templates[name] == obj, f"{name} differs from flowgrpo/k8s/objects.py's"


def _pods(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(pod_template(obj))


def _containers(obj: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    return {where: {c["name"]: c for c in pod["spec"]["containers"]} for where, pod in pod_template(obj)}


@pytest.mark.parametrize("aspect", ["labels", "probes", "security", "ports", "containers", "volumes"])
def test_each_aspect_matches(aspect: str) -> None:
    """The same comparison, field group by field group, so that a drift names what drifted."""
    code, templates = _code_objects(), _template_objects()
    for name, obj in code.items():
        tpl = templates[name]
        if aspect == "labels":
            assert tpl["metadata"]["labels"] == obj["metadata"]["labels"], name
            assert {w: p["metadata"]["labels"] for w, p in _pods(tpl).items()} == \
                {w: p["metadata"]["labels"] for w, p in _pods(obj).items()}, name
            if obj["kind"] in ("Service", "NetworkPolicy"):
                key = "selector" if obj["kind"] == "Service" else "podSelector"
                assert tpl["spec"][key] == obj["spec"][key], name
        for where, containers in _containers(obj).items():
            tpl_containers = _containers(tpl)[where]
            if aspect == "containers":
                assert list(tpl_containers) == list(containers), f"{name} {where}"
                assert {n: (c["image"], c["command"]) for n, c in tpl_containers.items()} == \
                    {n: (c["image"], c["command"]) for n, c in containers.items()}
            for cname, c in containers.items():
                t = tpl_containers[cname]
                if aspect == "probes":
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        assert t.get(probe) == c.get(probe), f"{name} {cname} {probe}"
                elif aspect == "security":
                    assert t.get("securityContext") == c.get("securityContext"), f"{name} {cname}"
                    assert _pods(tpl)[where]["spec"]["securityContext"] == _pods(obj)[where]["spec"]["securityContext"]
                    assert _pods(tpl)[where]["spec"].get("automountServiceAccountToken") is False
                elif aspect == "ports":
                    assert t.get("ports") == c.get("ports"), f"{name} {cname}"
                elif aspect == "volumes":
                    assert t.get("volumeMounts") == c.get("volumeMounts"), f"{name} {cname}"
                    assert _pods(tpl)[where]["spec"]["volumes"] == _pods(obj)[where]["spec"]["volumes"]
        if aspect == "ports" and obj["kind"] == "Service":
            assert tpl["spec"]["ports"] == obj["spec"]["ports"]


def test_the_code_uses_the_names_the_operator_and_server_need() -> None:
    code = _code_objects()
    job = next(o for o in code.values() if o["kind"] == "PyTorchJob")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    for containers in _containers(job).values():
        assert list(containers) == [objects.TRAINER_CONTAINER] == ["pytorch"]
        assert containers["pytorch"]["command"][:4] == ["torchrun", "--no-python", "flowgrpo", "train"]
    dep = next(o for o in code.values() if o["kind"] == "Deployment")
    (containers,) = _containers(dep).values()
    assert list(containers) == [objects.REWARD_CONTAINER]
    (c,) = containers.values()
    assert c["command"][:2] == ["flowgrpo", "serve-reward"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    svc = next(o for o in code.values() if o["kind"] == "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"] == "http"


def _strip_placement(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    for _, pod in pod_template(obj):
        pod["spec"].pop("nodeSelector", None)
        pod["spec"].pop("tolerations", None)
    return obj


def test_prod_templates_only_add_gpu_placement() -> None:
    base = _by_name(rendered("base/templates"))
    prod = _by_name(rendered("overlays/prod/templates"))
    assert set(base) == set(prod)
    for name, obj in prod.items():
        assert _strip_placement(obj) == base[name], f"{name}: the prod overlay changes more than placement"
    job = next(o for o in prod.values() if o["kind"] == "PyTorchJob")
    for where, pod in pod_template(job):
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, where
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]


def test_static_reward_policy_fits_the_code_labels() -> None:
    """The default-deny of manifests/base selects the code's reward pods and nothing of the trainer; the
    per-run policy admits the run's trainer pods and selects only that run's servers."""
    (deny,) = load_yaml(MANIFESTS / "base" / "networkpolicy-reward-servers.yaml")
    assert deny["spec"]["policyTypes"] == ["Ingress"] and deny["spec"]["ingress"] == []
    code = _code_objects()
    selector = deny["spec"]["podSelector"]["matchLabels"]
    for obj in code.values():
        for _, pod in pod_template(obj):
            labels = pod["metadata"]["labels"]
            assert (selector.items() <= labels.items()) == (obj["kind"] == "Deployment"), name_of(obj)
    run_policy = next(o for o in code.values() if o["kind"] == "NetworkPolicy")
    job = next(o for o in code.values() if o["kind"] == "PyTorchJob")
    dep = next(o for o in code.values() if o["kind"] == "Deployment")
    (peer,) = run_policy["spec"]["ingress"][0]["from"]
    for _, pod in pod_template(job):
        assert peer["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (dep_pod,) = _pods(dep).values()
    assert run_policy["spec"]["podSelector"]["matchLabels"].items() <= dep_pod["metadata"]["labels"].items()
    ports = {p["containerPort"] for c in dep_pod["spec"]["containers"] for p in c["ports"]}
    assert {p["port"] for p in run_policy["spec"]["ingress"][0]["ports"]} == ports
