"""The pipeline's RBAC: the Role in manifests/base grants exactly what the backend uses, and the backend gets
through whole runs (and their retries and failures) with nothing more, against a fake API server that
enforces the Role."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from flowgrpo.backends.base import BackendError, RewardServerSpec, TrainingFailed, TrainJobSpec, get_backend
from flowgrpo.cli import build_parser
from flowgrpo.k8s import rewards
from flowgrpo.k8s.pytorchjob import run_job
from tests.deploy.conftest import DEPLOYABLE, MANIFESTS, load_yaml, rendered
from tests.k8s.conftest import NAMESPACE, RUN_ID
from tests.k8s.fake_apiserver import FakeKube, JobScript, rbac_attributes

SERVICE_ACCOUNT = "flowgrpo-pipeline-runner"
CRUD = ("create", "get", "list", "watch", "delete")
#: the issue's list, plus networkpolicies for the per-run reward-server isolation
EXPECTED = {
    *(("kubeflow.org", "pytorchjobs", v) for v in CRUD),
    *(("apps", "deployments", v) for v in CRUD),
    *(("", "services", v) for v in CRUD),
    *(("networking.k8s.io", "networkpolicies", v) for v in CRUD),
    *(("", "pods", v) for v in ("get", "list", "watch")),
    ("", "pods/log", "get"),
}
#: what the backend may ask for without being granted it: it leaves the events out of its error messages
TOLERATED_DENIALS = {("", "events", "list")}
#: KFP's own machinery (components/kfp-runtime-rbac), all by resource name where the API allows it
KFP_RUNTIME = {
    ("", "secrets", "get", ("mlpipeline-minio-artifact",)),
    ("", "configmaps", "get", ("kfp-launcher",)),
    ("argoproj.io", "workflowtaskresults", "create", ()),
    ("argoproj.io", "workflowtaskresults", "patch", ()),
}


def _grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def _role() -> dict[str, Any]:
    (role,) = load_yaml(MANIFESTS / "base" / "role.yaml")
    return role


def test_the_role_grants_exactly_the_list() -> None:
    role = _role()
    assert role["kind"] == "Role" and role["metadata"]["name"] == SERVICE_ACCOUNT  # namespaced, not a ClusterRole
    assert _grants(role) == EXPECTED
    for rule in role["rules"]:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"]
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames / nonResourceURLs tricks
    granted = _grants(role)
    for forbidden in [("", "secrets", "get"), ("", "secrets", "list"), ("", "pods/exec", "create"),
                      ("", "pods/exec", "get"), ("apps", "deployments", "update"), ("apps", "deployments", "patch"),
                      ("", "services", "update"), ("", "services", "patch"), ("kubeflow.org", "pytorchjobs", "patch"),
                      ("", "events", "list")]:
        assert forbidden not in granted


def test_the_service_account_is_bound_and_is_the_cli_default() -> None:
    (binding,) = load_yaml(MANIFESTS / "base" / "rolebinding.yaml")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT}]
    (sa,) = load_yaml(MANIFESTS / "base" / "serviceaccount.yaml")
    assert sa["metadata"]["name"] == SERVICE_ACCOUNT
    assert build_parser().parse_args(["pipeline", "submit"]).service_account == SERVICE_ACCOUNT
    assert build_parser().parse_args(["pipeline", "schedule", "--cron", "0 0 3 * * *"]).service_account == \
        SERVICE_ACCOUNT


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_rendered_rbac_is_no_broader(overlay: str) -> None:
    """What an overlay applies: the Role above, and KFP's runtime needs scoped by resource name; no
    ClusterRole, nothing bound to another subject."""
    objs = rendered(overlay)
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Role"}
    assert _grants(roles.pop(SERVICE_ACCOUNT)) == EXPECTED
    (kfp,) = roles.values()
    assert {(g, r, v, tuple(rule.get("resourceNames", []))) for rule in kfp["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]} == KFP_RUNTIME
    for binding in (o for o in objs if o["kind"] == "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                                        "namespace": binding["metadata"]["namespace"]}]
        assert binding["roleRef"]["name"] in (SERVICE_ACCOUNT, kfp["metadata"]["name"])


# --------------------------------------------------------------------------------- the backend under RBAC
@pytest.fixture
def kube() -> Iterator[FakeKube]:
    fake = FakeKube().start()
    granted = _grants(_role())
    fake.authorizer = lambda group, resource, verb: (group, resource, verb) in granted
    yield fake
    fake.stop()


@pytest.fixture
def api(kube: FakeKube) -> Iterator[client.ApiClient]:
    api_client = kube.api_client()
    yield api_client
    api_client.close()


def _specs() -> list[RewardServerSpec]:
    return [RewardServerSpec(name="ocr", rewards=["ocr"], image="r:1", api_key_secret="flowgrpo-reward-api-key"),
            RewardServerSpec(name="jpeg", rewards=["jpeg_compressibility"], image="r:1", port=8080)]


def _job(**kw: Any) -> TrainJobSpec:
    settings: dict[str, Any] = {"name": "fgrpo-3f2a9c1e", "config_uri": "s3://b/config.yaml", "nodes": 2,
                                "image": "t:1", "env_from_secrets": ["flowgrpo-s3"], "timeout_s": 30, **kw}
    return TrainJobSpec(**settings)


def test_whole_runs_need_nothing_beyond_the_role(kube: FakeKube, api: client.ApiClient) -> None:
    """Every request of a whole run, a retried deploy with a changed spec, a failed and retried training,
    a training timeout and a reward-server timeout, as (API group, resource, verb): all granted by the Role,
    except listing events, which is refused and tolerated."""
    backend = get_backend("kubernetes", namespace=NAMESPACE, api_client=api, poll_s=0.01)
    log = []
    # a whole run
    assert set(backend.deploy_rewards(RUN_ID, _specs(), timeout_s=5)) == {"ocr", "jpeg_compressibility"}
    assert backend.train(RUN_ID, _job(), log=log.append)["job"] == "fgrpo-3f2a9c1e"
    assert len(backend.teardown(RUN_ID)) == 6
    # a retried deploy task whose spec changed: delete, wait until gone, create (no update / patch)
    backend.deploy_rewards(RUN_ID, _specs(), timeout_s=5)
    kube.delete_linger_reads = 2
    changed = _specs()
    changed[0].memory = "16Gi"
    backend.deploy_rewards(RUN_ID, changed, timeout_s=5)
    kube.delete_linger_reads = 0
    # a training that fails (worker logs read), then its retry deletes the Failed job and starts again
    kube.job_script = JobScript(outcome="Failed", failed_replica="worker")
    with pytest.raises(TrainingFailed):
        run_job(_job(), RUN_ID, NAMESPACE, api, poll_s=0.01, log=log.append)
    kube.job_script = JobScript()
    run_job(_job(), RUN_ID, NAMESPACE, api, poll_s=0.01, log=log.append)
    # a training that times out is deleted
    kube.job_script = JobScript(outcome="Running")
    with pytest.raises(TrainingFailed, match="did not succeed within"):
        run_job(_job(name="fgrpo-slow", timeout_s=0.2), RUN_ID, NAMESPACE, api, poll_s=0.02, log=log.append)
    assert backend.teardown(RUN_ID)
    # reward servers that never become available: pods and logs are read, events are not readable
    kube.deployments_available = False
    with pytest.raises(BackendError) as err:
        rewards.deploy(_specs()[:1], "other-run", NAMESPACE, api, timeout_s=0.2, poll_s=0.02)
    assert "CrashLoopBackOff" in str(err.value) and "model weights not found" in str(err.value)
    assert backend.teardown("other-run")
    assert backend.teardown(RUN_ID) == []

    used = {rbac_attributes(r) for r in kube.requests}
    granted = _grants(_role())
    assert used - granted == TOLERATED_DENIALS
    # and the Role is hardly broader than the backend needs: of the issue's list, only `watch` (which the
    # backend never uses: it polls) and `get` on single pods (it lists them by label) go unused
    assert granted - used == {g for g in granted if g[2] == "watch"} | {("", "pods", "get")}
