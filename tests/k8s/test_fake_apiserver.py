"""The fake API server behaves like the real one where the backend depends on it."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.k8s.fake_apiserver import FakeKube, label_match


@pytest.mark.parametrize(("selector", "expected"), [
    ("a=1", True), ("a==1", True), ("a!=1", False), ("a=2", False), ("a", True), ("!a", False), ("c", False),
    ("a=1,b=x", True), ("a=1,b=y", False), ("b in (x,y)", True), ("b in (y)", False), ("c in (x)", False),
    ("b notin (y, z)", True), ("b notin (x)", False), ("a=1,b in (x, y),!c", True),
])
def test_label_selectors(selector: str, expected: bool) -> None:
    assert label_match(selector, {"a": "1", "b": "x"}) is expected


def test_errors_are_status_objects(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as err:
        core.read_namespaced_service("nope", "ns")
    status = json.loads(err.value.body)
    assert err.value.status == 404 and status["kind"] == "Status" and status["reason"] == "NotFound"
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "labels": {"k": "v"}},
            "spec": {"ports": [{"port": 80}]}}
    core.create_namespaced_service("ns", body)
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service("ns", body)
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"
    stale = {**body, "metadata": {**body["metadata"], "resourceVersion": "0"}}
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_service("s", "ns", stale)
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "Conflict"


def test_patch_list_and_log_tail(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service("ns", {"metadata": {"name": "s", "labels": {"k": "v"}},
                                          "spec": {"ports": [{"port": 80}]}})
    core.patch_namespaced_service("s", "ns", {"metadata": {"labels": {"k": None, "new": "1"}}})
    assert kube.get("services", "ns", "s")["metadata"]["labels"] == {"new": "1"}
    assert [s.metadata.name for s in core.list_namespaced_service("ns", label_selector="new=1").items] == ["s"]
    assert core.list_namespaced_service("other").items == []
    kube.add_pod("ns", "p", {"role": "x"}, log=["a", "b", "c"])
    assert core.read_namespaced_pod_log("p", "ns", tail_lines=2) == "b\nc\n"
    kube.add_pod("ns", "q", {}, phase="Pending")
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod_log("q", "ns")
    assert err.value.status == 400 and "waiting to start" in json.loads(err.value.body)["message"]
