"""flowgrpo.pipeline.kfp_client against a fake KFP API server (real HTTP, no cluster).

The fake server records every request, so these tests check what kfp 2.17's
client actually puts on the wire for upload / submit / schedule, and that
local validation failures never reach the server.
"""

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowgrpo.pipeline.kfp_client import (
    PipelineClientError,
    git_sha,
    make_client,
    pipeline_version_name,
    schedule,
    submit,
    upload,
    validate_cron,
)
from tests.pipelines.fake_kfp_server import FakeKfpServer

API = "/apis/v2beta1"
PIPELINE = "flowgrpo-train"


# ----------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _isolated_kfp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep kfp.Client away from the developer's ~/.config/kfp and KF_* env."""
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for var in (
        "KFP_HOST",
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_UI_ENDPOINT",
        "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
        "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server() -> Iterator[FakeKfpServer]:
    fake = FakeKfpServer().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def client(server: FakeKfpServer):
    return make_client(server.url)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compiled one-component pipeline (no kfp install in the image).

    This module has no ``from __future__ import annotations`` on purpose: kfp
    reads component annotations at runtime and takes the string ``"str"`` for
    an artifact type.
    """
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
    def echo(msg: str) -> str:
        return msg

    @dsl.pipeline(name="tiny")
    def tiny(msg: str = "hi", steps: int = 1) -> None:
        echo(msg=msg)

    path = tmp_path_factory.mktemp("pkg") / "tiny.yaml"
    compiler.Compiler().compile(tiny, str(path))
    return path


def _uploaded(client, package: Path, version: str = "0.1.0-1a2b3c4") -> dict:
    return upload(client, package, PIPELINE, version)


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------- upload


def test_first_upload_creates_pipeline_with_named_version(server, client, package):
    result = upload(client, package, PIPELINE, "0.1.0-1a2b3c4", description="GRPO train")

    assert result["created"] is True
    assert result["version_name"] == "0.1.0-1a2b3c4"
    assert server.pipelines[result["pipeline_id"]]["display_name"] == PIPELINE
    versions = [v["display_name"] for v in server.versions.values()]
    assert versions == ["0.1.0-1a2b3c4"]  # not a first version named after the pipeline
    (create,) = server.requests_to("POST", f"{API}/pipelines")
    assert create.body["display_name"] == PIPELINE
    (sent,) = server.requests_to("POST", f"{API}/pipelines/upload_version")
    assert sent.query == {
        "name": "0.1.0-1a2b3c4",
        "pipelineid": result["pipeline_id"],
        "description": "GRPO train",
    }
    assert sent.files == {"uploadfile": "tiny.yaml"}
    assert server.versions[result["version_id"]]["pipeline_spec"]["pipelineInfo"]["name"] == "tiny"


def test_second_upload_adds_a_version(server, client, package):
    first = _uploaded(client, package, "0.1.0-1a2b3c4")
    second = _uploaded(client, package, "0.1.0-9f8e7d6")

    assert second["created"] is True
    assert second["pipeline_id"] == first["pipeline_id"]
    assert second["version_id"] != first["version_id"]
    assert len(server.pipelines) == 1
    assert len(server.requests_to("POST", f"{API}/pipelines")) == 1
    assert sorted(v["display_name"] for v in server.versions.values()) == [
        "0.1.0-1a2b3c4",
        "0.1.0-9f8e7d6",
    ]


def test_reupload_of_same_version_is_a_noop(server, client, package):
    first = _uploaded(client, package)
    again = _uploaded(client, package)

    assert again == {**first, "created": False}
    assert len(server.requests_to("POST", f"{API}/pipelines/upload_version")) == 1
    assert len(server.versions) == 1


def test_upload_adds_version_to_pipeline_created_elsewhere(server, client, package):
    pipeline_id = server.add_pipeline(PIPELINE, (PIPELINE,))  # as the UI/upload_pipeline does

    result = _uploaded(client, package)

    assert result["pipeline_id"] == pipeline_id and result["created"] is True
    assert server.requests_to("POST", f"{API}/pipelines") == []


@pytest.mark.parametrize("version", ["0.1.0-1a2b3c4-dirty", "0.1.0-dev"])
def test_reupload_of_unpinned_version_is_refused(server, client, package, version):
    _uploaded(client, package, version)
    with pytest.raises(PipelineClientError, match="pins no commit"):
        _uploaded(client, package, version)
    assert len(server.requests_to("POST", f"{API}/pipelines/upload_version")) == 1


def test_upload_race_lost_with_409_returns_the_winner(server, client, package):
    server.fail("POST", f"{API}/pipelines/upload_version", 409, apply=True)

    result = _uploaded(client, package)

    assert result["created"] is False
    assert server.versions[result["version_id"]]["display_name"] == "0.1.0-1a2b3c4"


def test_upload_409_without_such_version_is_an_error(server, client, package):
    server.fail("POST", f"{API}/pipelines/upload_version", 409, "Failed to create a pipeline version")

    with pytest.raises(PipelineClientError) as info:
        _uploaded(client, package)

    message = str(info.value)
    assert server.url in message and "upload of pipeline version" in message
    assert "409" in message and "Failed to create a pipeline version" in message
    assert info.value.status == 409


def test_upload_of_missing_package_sends_nothing(server, client, tmp_path):
    before = len(server.requests)
    with pytest.raises(PipelineClientError, match="does not exist"):
        upload(client, tmp_path / "nope.yaml", PIPELINE, "0.1.0-1a2b3c4")
    assert len(server.requests) == before


# ------------------------------------------------------------------- submit


def test_submit_from_package(server, client, package):
    run_id = submit(
        client,
        experiment="flowgrpo-dev",
        run_name="smoke",
        arguments={"msg": "hello", "steps": 3},
        package_path=package,
        service_account="flowgrpo-runner",
        enable_caching=False,
    )

    (sent,) = server.requests_to("POST", f"{API}/runs")
    body = sent.body
    assert server.runs[run_id]["display_name"] == "smoke"
    assert body["runtime_config"]["parameters"] == {"msg": "hello", "steps": 3}
    assert body["pipeline_spec"]["pipelineInfo"]["name"] == "tiny"
    assert "pipeline_version_reference" not in body
    assert body["service_account"] == "flowgrpo-runner"
    caching = body["pipeline_spec"]["root"]["dag"]["tasks"]["echo"]["cachingOptions"]
    assert caching.get("enableCache", False) is False
    (experiment,) = server.experiments.values()
    assert experiment["display_name"] == "flowgrpo-dev"
    assert body["experiment_id"] == experiment["experiment_id"]


def test_submit_pinned_version_creates_experiment_once(server, client, package):
    uploaded = _uploaded(client, package)
    common = dict(
        experiment="flowgrpo-prod",
        arguments={"steps": 5},
        pipeline_id=uploaded["pipeline_id"],
        version_id=uploaded["version_id"],
    )

    first = submit(client, run_name="a", **common)
    second = submit(client, run_name="b", **common)

    assert first != second
    assert len(server.requests_to("POST", f"{API}/experiments")) == 1
    for sent in server.requests_to("POST", f"{API}/runs"):
        assert sent.body["pipeline_version_reference"] == {
            "pipeline_id": uploaded["pipeline_id"],
            "pipeline_version_id": uploaded["version_id"],
        }
        assert sent.body["runtime_config"]["parameters"] == {"steps": 5}
        assert "pipeline_spec" not in sent.body


@pytest.mark.parametrize(
    "source, match",
    [
        ({}, "nothing to run"),
        ({"pipeline_id": "p"}, "nothing to run"),
        ({"package_path": "x.yaml", "pipeline_id": "p", "version_id": "v"}, "not both"),
        ({"pipeline_id": "p", "version_id": "v", "enable_caching": True}, "enable_caching"),
    ],
)
def test_submit_bad_source_sends_nothing(server, client, source, match):
    before = len(server.requests)
    with pytest.raises(PipelineClientError, match=match):
        submit(client, experiment="e", run_name="r", arguments={}, **source)
    assert len(server.requests) == before


def test_submit_refuses_non_json_arguments(server, client, package):
    before = len(server.requests)
    with pytest.raises(PipelineClientError, match="JSON"):
        submit(client, experiment="e", run_name="r", arguments={"p": Path("x")}, package_path=package)
    assert len(server.requests) == before


def test_submit_keeps_stdout_clean(server, client, package, capsys):
    """kfp prints 'Run details: <link>'; the CLI's stdout must carry only ids."""
    submit(client, experiment="e", run_name="r", arguments={}, package_path=package)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Run details" in captured.err


# ----------------------------------------------------------------- schedule


def test_schedule_sends_pinned_cron_with_safe_defaults(server, client, package):
    uploaded = _uploaded(client, package)

    recurring_id = schedule(
        client,
        experiment="flowgrpo-prod",
        job_name="nightly",
        cron="0 0 3 * * *",
        pipeline_id=uploaded["pipeline_id"],
        version_id=uploaded["version_id"],
        arguments={"steps": 100},
        service_account="flowgrpo-runner",
    )

    (sent,) = server.requests_to("POST", f"{API}/recurringruns")
    body = sent.body
    assert server.recurring_runs[recurring_id]["display_name"] == "nightly"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["pipeline_version_reference"] == {
        "pipeline_id": uploaded["pipeline_id"],
        "pipeline_version_id": uploaded["version_id"],
    }
    assert "pipeline_spec" not in body
    assert body["runtime_config"]["parameters"] == {"steps": 100}
    assert body["service_account"] == "flowgrpo-runner"


def test_schedule_disabled_and_custom_concurrency(server, client, package):
    uploaded = _uploaded(client, package)
    schedule(
        client,
        experiment="e",
        job_name="weekly",
        cron="0 30 2 ? * SUN",
        pipeline_id=uploaded["pipeline_id"],
        version_id=uploaded["version_id"],
        arguments={},
        max_concurrency=2,
        no_catchup=False,
        enabled=False,
    )
    (sent,) = server.requests_to("POST", f"{API}/recurringruns")
    assert sent.body["mode"] == "DISABLE"
    assert int(sent.body["max_concurrency"]) == 2
    assert sent.body["no_catchup"] is False


def test_schedule_refuses_a_second_recurring_run_with_the_same_name(server, client, package):
    uploaded = _uploaded(client, package)
    kwargs = dict(
        experiment="e",
        job_name="nightly",
        cron="0 0 3 * * *",
        pipeline_id=uploaded["pipeline_id"],
        version_id=uploaded["version_id"],
        arguments={},
    )
    first = schedule(client, **kwargs)

    with pytest.raises(PipelineClientError, match=f"already exists.*{first}"):
        schedule(client, **kwargs)
    assert len(server.requests_to("POST", f"{API}/recurringruns")) == 1


@pytest.mark.parametrize(
    "cron",
    [
        "0 3 * * *",  # classic 5-field crontab
        "0 0 3 * * * *",
        "60 0 3 * * *",
        "0 0 24 * * *",
        "0 0 3 0 * *",
        "0 0 3 * 13 *",
        "0 0 3 * * 7",
        "0 0 3 * * FOO",
        "0 */0 * * * *",
        "0 5-1 * * * *",
        "0 1,,2 * * * *",
        "? * * * * *",
        "0 0 3 L * *",
        "",
        "@every 1h",
    ],
)
def test_schedule_bad_cron_fails_before_any_request(server, client, cron):
    before = len(server.requests)
    with pytest.raises(PipelineClientError, match="--cron"):
        schedule(
            client,
            experiment="e",
            job_name="j",
            cron=cron,
            pipeline_id="p",
            version_id="v",
            arguments={},
        )
    assert len(server.requests) == before


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": -1}, "max_concurrency"),
        ({"max_concurrency": 11}, "max_concurrency"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"version_id": None}, "pinned version"),
        ({"version_id": ""}, "pinned version"),
    ],
)
def test_schedule_bad_options_fail_before_any_request(server, client, overrides, match):
    kwargs = dict(
        experiment="e",
        job_name="j",
        cron="0 0 3 * * *",
        pipeline_id="p",
        version_id="v",
        arguments={},
    )
    before = len(server.requests)
    with pytest.raises(PipelineClientError, match=match):
        schedule(client, **{**kwargs, **overrides})
    assert len(server.requests) == before


# ------------------------------------------------------------- server errors


def test_server_500_names_host_and_operation(server, client, package):
    server.fail("POST", f"{API}/runs", 500, "database is on fire")

    with pytest.raises(PipelineClientError) as info:
        submit(client, experiment="e", run_name="smoke", arguments={}, package_path=package)

    message = str(info.value)
    assert server.url in message
    assert "submission of run 'smoke'" in message
    assert "HTTP 500" in message and "database is on fire" in message
    assert "Traceback" not in message


def test_recurring_run_409_names_host_and_operation(server, client, package):
    uploaded = _uploaded(client, package)
    server.fail("POST", f"{API}/recurringruns", 409, "already exists")

    with pytest.raises(PipelineClientError) as info:
        schedule(
            client,
            experiment="e",
            job_name="nightly",
            cron="0 0 3 * * *",
            pipeline_id=uploaded["pipeline_id"],
            version_id=uploaded["version_id"],
            arguments={},
        )
    assert server.url in str(info.value)
    assert "creation of recurring run 'nightly'" in str(info.value)
    assert info.value.status == 409


def test_unreachable_host_fails_at_connect():
    host = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(PipelineClientError) as info:
        make_client(host)
    assert host in str(info.value) and "cannot reach" in str(info.value)


def test_unreachable_host_names_the_operation(package):
    host = f"http://127.0.0.1:{_free_port()}"
    client = make_client(host, namespace="team-a")  # a namespace skips the healthz probe

    with pytest.raises(PipelineClientError) as info:
        upload(client, package, PIPELINE, "0.1.0-1a2b3c4")
    assert host in str(info.value) and "lookup of pipeline" in str(info.value)


def test_healthz_error_fails_fast(server):
    """Stock kfp retries healthz 5x with 5 s sleeps; ours asks once."""
    server.fail("GET", f"{API}/healthz", 401, "bad token", times=None)

    start = time.monotonic()
    with pytest.raises(PipelineClientError) as info:
        make_client(server.url, existing_token="wrong")
    assert time.monotonic() - start < 2
    assert "HTTP 401" in str(info.value) and "healthz" in str(info.value)
    assert server.requests[0].headers.get("authorization") == "Bearer wrong"


# ---------------------------------------------------------------- make_client


@pytest.mark.parametrize("host", ["", "   ", None])
def test_make_client_needs_a_host(host):
    with pytest.raises(PipelineClientError, match="pass --host or set KFP_HOST"):
        make_client(host)


def test_make_client_falls_back_to_kfp_host_env(server, monkeypatch):
    monkeypatch.setenv("KFP_HOST", server.url)
    client = make_client("")
    assert client._existing_config.host == server.url


def test_make_client_with_namespace_sends_nothing_and_scopes_experiments(server, package):
    client = make_client(server.url, namespace="team-a")
    assert server.requests == []

    submit(client, experiment="e", run_name="r", arguments={}, package_path=package)
    (created,) = server.requests_to("POST", f"{API}/experiments")
    assert created.body["namespace"] == "team-a"


def test_make_client_defaults_to_https():
    client = make_client("kfp.example.com:443", namespace="team-a")
    assert client._existing_config.host == "https://kfp.example.com:443"


# ------------------------------------------------------------------- cron unit


@pytest.mark.parametrize(
    "cron",
    [
        "0 0 3 * * *",
        "0 0 9 ? * 2-6",
        "*/30 */15 * * * *",
        "0 0 3 * * MON-FRI",
        "0 0 0 1 JAN,jul ?",
        "30 5 1-5/2 * * *",
        "0 0 12 1/7 * sun",
        "0 0 3 * * 0,6",
    ],
)
def test_validate_cron_accepts_six_field_expressions(cron):
    assert validate_cron(cron) == cron


def test_validate_cron_normalises_whitespace_and_descriptors():
    assert validate_cron("  0  0 3 * * *\n") == "0 0 3 * * *"
    assert validate_cron("@Daily") == "@daily"


def test_five_field_cron_message_explains_the_fix():
    with pytest.raises(PipelineClientError) as info:
        validate_cron("0 3 * * *")
    message = str(info.value)
    assert "--cron '0 3 * * *'" in message
    assert "5 fields" in message and "seconds" in message
    assert "--cron '0 0 3 * * *'" in message  # the fix, ready to paste


def test_bad_field_message_names_the_field():
    with pytest.raises(PipelineClientError, match="hour field '24'.*0-23"):
        validate_cron("0 0 24 * * *")


# ------------------------------------------------------------- version names


def test_pipeline_version_name():
    assert pipeline_version_name("0.1.0", "1a2b3c4") == "0.1.0-1a2b3c4"
    assert pipeline_version_name("0.1.0", "1a2b3c4-dirty") == "0.1.0-1a2b3c4-dirty"
    assert pipeline_version_name("0.1.0", None) == "0.1.0-dev"
    assert pipeline_version_name("0.1.0", "") == "0.1.0-dev"
    with pytest.raises(PipelineClientError):
        pipeline_version_name("", "1a2b3c4")


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-commit git repository, isolated from any enclosing repository."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    path = tmp_path / "repo"
    path.mkdir()
    _git(path, "init", "-q")
    (path / "a.txt").write_text("one\n")
    _git(path, "add", "a.txt")
    _git(path, "commit", "-q", "-m", "first")
    return path


def test_git_sha_of_clean_tree(repo):
    assert git_sha(repo) == _git(repo, "rev-parse", "--short=7", "HEAD")


def test_git_sha_ignores_untracked_files(repo):
    (repo / "new.txt").write_text("untracked\n")
    assert not git_sha(repo).endswith("-dirty")


def test_git_sha_marks_uncommitted_changes_dirty(repo):
    (repo / "a.txt").write_text("two\n")
    assert git_sha(repo) == _git(repo, "rev-parse", "--short=7", "HEAD") + "-dirty"


def test_git_sha_defaults_to_working_directory(repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert git_sha() == _git(repo, "rev-parse", "--short=7", "HEAD")


def test_git_sha_outside_a_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    (tmp_path / "plain").mkdir()
    assert git_sha(tmp_path / "plain") is None
    assert git_sha(tmp_path / "missing") is None


def test_git_sha_without_commits(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    _git(tmp_path, "init", "-q")
    assert git_sha(tmp_path) is None


def test_git_sha_without_git_installed(repo, monkeypatch):
    monkeypatch.setenv("PATH", str(repo / "no-bin-here"))
    assert git_sha(repo) is None
