"""KFP API operations behind ``flowgrpo pipeline upload|schedule|submit``.

The CLI is a thin wrapper; everything that talks to the Kubeflow Pipelines API
server lives here so it can be tested against a fake server
(``tests/pipelines/fake_kfp_server.py``) without a cluster.

Design choices (see ``orchestration.md`` §1 "Versioned upload" / "Recurring
runs" and §3 item 10):

* **One pipeline version per git commit**, named ``<package version>-<short sha>``
  (``0.1.0-1a2b3c4``), so a run or a schedule can always be traced back to the
  code it executes. Re-uploading the same commit is a no-op.
* **Recurring runs pin a pipeline version id.** Without one, KFP (backend
  >= 2.5) runs whatever version was uploaded last, so any upload (from a
  branch, a laptop) silently changes what production executes. The price of
  pinning (kfp #13933, #11296): the backend compiles the pinned version once,
  when the recurring run is created, and bakes the launcher/driver images of
  that moment into it; after a KFP backend upgrade, delete and recreate the
  schedule (recurring runs cannot be updated in place, kfp #3789).
* ``max_concurrency=1`` and ``no_catchup=True`` by default: two overlapping
  training/promotion runs race on the model alias (kfp #7261), and a paused
  schedule must not fire a burst of back-filled runs when re-enabled.
* KFP cron has **6 fields, seconds first**. The backend parses it with
  robfig/cron v1, which also accepts 5 fields but reads them as
  ``second minute hour day month``: the classic ``0 3 * * *`` would fire at
  minute 3 of *every* hour. We therefore refuse 5-field expressions.
* Every server failure (HTTP error, connection refused) becomes a
  :class:`PipelineClientError` that names the host and the operation, so the
  CLI prints one line instead of a ``kfp_server_api`` traceback.

Importing this module does not import ``kfp`` (about half a second); it is
imported lazily by the functions that talk to the server.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

KFP_HOST_ENV = "KFP_HOST"

__all__ = [
    "PipelineClientError",
    "validate_cron",
    "git_sha",
    "pipeline_version_name",
    "make_client",
    "upload",
    "submit",
    "schedule",
]


class PipelineClientError(ValueError):
    """A user-facing failure of a pipeline upload/submit/schedule.

    ``status`` carries the HTTP status when the server answered with an error
    (``None`` for local validation errors and unreachable hosts), so callers
    can tell a conflict (409) from other failures without parsing text.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- cron

_CRON_EXAMPLE = "'0 0 3 * * *' (03:00:00 every day)"
_CRON_LAYOUT = "second minute hour day-of-month month day-of-week"
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_WEEKDAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# robfig/cron v1 descriptors; "@every <duration>" is left out on purpose: it is
# an interval, not a wall-clock schedule, and reads badly next to no_catchup.
_CRON_DESCRIPTORS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)


class _CronField:
    """Bounds and aliases of one cron field, as robfig/cron v1 defines them."""

    def __init__(
        self, name: str, low: int, high: int, names: tuple[str, ...] = (), question: bool = False
    ) -> None:
        self.name = name
        self.low = low
        self.high = high
        # Names map to consecutive numbers starting at `low` (JAN=1, SUN=0).
        self.aliases = {alias: low + i for i, alias in enumerate(names)}
        self.question = question  # '?' ("no specific value") only for the day fields


_CRON_FIELDS = (
    _CronField("second", 0, 59),
    _CronField("minute", 0, 59),
    _CronField("hour", 0, 23),
    _CronField("day-of-month", 1, 31, question=True),
    _CronField("month", 1, 12, _MONTHS),
    _CronField("day-of-week", 0, 6, _WEEKDAYS, question=True),
)


def validate_cron(expr: str) -> str:
    """Check a KFP cron expression and return it with whitespace normalised.

    Raises :class:`PipelineClientError` naming ``--cron``, the value and the
    fix. A 5-field (classic crontab) expression is the main trap: the backend
    would accept it and fire at a different time (see the module docstring).
    """
    text = " ".join(str(expr).split())
    if not text:
        raise PipelineClientError(
            f"--cron is empty; KFP expects 6 fields ({_CRON_LAYOUT}), e.g. {_CRON_EXAMPLE}"
        )
    if text.startswith("@"):
        return _validate_descriptor(expr, text)
    fields = text.split(" ")
    if len(fields) == 5:
        raise PipelineClientError(
            f"--cron {expr!r} has 5 fields (classic crontab: minute hour day month weekday), "
            f"but KFP cron has 6 fields with seconds first ({_CRON_LAYOUT}); the KFP backend "
            f"would read yours as starting with seconds and fire at the wrong times. "
            f"Prepend a seconds field: --cron '0 {text}'"
        )
    if len(fields) != 6:
        raise PipelineClientError(
            f"--cron {expr!r} has {len(fields)} fields; KFP expects 6 ({_CRON_LAYOUT}), "
            f"e.g. {_CRON_EXAMPLE}"
        )
    for value, field in zip(fields, _CRON_FIELDS):
        problem = _cron_field_problem(value, field)
        if problem:
            raise PipelineClientError(
                f"--cron {expr!r}: {field.name} field {value!r} is invalid: {problem} "
                f"(fields: {_CRON_LAYOUT}; e.g. {_CRON_EXAMPLE})"
            )
    return text


def _validate_descriptor(expr: str, text: str) -> str:
    """Accept the fixed robfig descriptors (``@daily``...), refuse anything else."""
    if text.lower() in _CRON_DESCRIPTORS:
        return text.lower()
    allowed = ", ".join(sorted(_CRON_DESCRIPTORS))
    raise PipelineClientError(
        f"--cron {expr!r} is not a supported descriptor ({allowed}); "
        f"use a 6-field cron ({_CRON_LAYOUT}), e.g. {_CRON_EXAMPLE}"
    )


def _cron_field_problem(value: str, field: _CronField) -> str | None:
    """Why one cron field is invalid, or ``None``. Lists, ranges, steps, names."""
    if value == "?":
        if field.question:
            return None
        return "'?' is only allowed in the day-of-month and day-of-week fields"
    for item in value.split(","):
        problem = _cron_item_problem(item, field)
        if problem:
            return problem
    return None


def _cron_item_problem(item: str, field: _CronField) -> str | None:
    """Check one list item: ``*``, ``N``, ``A-B``, each optionally ``/STEP``."""
    if not item:
        return "empty list item"
    base, slash, step = item.partition("/")
    if slash and not (step.isdigit() and int(step) >= 1):
        return f"step {step!r} must be a positive integer"
    if base == "*":
        return None
    low_text, dash, high_text = base.partition("-")
    low = _cron_value(low_text, field)
    if low is None:
        return _cron_value_problem(low_text, field)
    if not dash:
        return None
    high = _cron_value(high_text, field)
    if high is None:
        return _cron_value_problem(high_text, field)
    if low > high:
        return f"range {base!r} runs backwards"
    return None


def _cron_value(text: str, field: _CronField) -> int | None:
    """A single number or name within the field's bounds, else ``None``."""
    if text.isdigit():
        number = int(text)
        return number if field.low <= number <= field.high else None
    return field.aliases.get(text.upper())


def _cron_value_problem(text: str, field: _CronField) -> str:
    """Explain why ``text`` is not a valid value of ``field``."""
    if text.isdigit():
        return f"{text} is outside {field.low}-{field.high}"
    if field.aliases:
        names = "/".join(field.aliases)
        return f"{text!r} is not a number in {field.low}-{field.high} or a name ({names})"
    return f"{text!r} is not a number in {field.low}-{field.high}"


# ------------------------------------------------------------------ version names


def git_sha(repo_dir: str | Path | None = None) -> str | None:
    """Short commit sha of ``repo_dir`` (default: the working directory).

    Returns ``<sha>-dirty`` when tracked files have uncommitted changes (a
    version name must not claim a commit it does not match), and ``None``
    outside a git repository, in a repository without commits, or when git is
    not installed: callers then fall back to a ``-dev`` version name.
    """
    cwd = Path(repo_dir) if repo_dir is not None else Path.cwd()
    sha = _git(cwd, "rev-parse", "--short=7", "HEAD")
    if not sha:
        return None
    changes = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    # If status itself fails we cannot prove the tree is clean: say dirty.
    return f"{sha}-dirty" if changes is None or changes else sha


def _git(cwd: Path, *args: str) -> str | None:
    """Run one git command; ``None`` on any failure instead of an exception."""
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def pipeline_version_name(package_version: str, git_sha: str | None) -> str:
    """``<package version>-<short sha>`` (``0.1.0-1a2b3c4``), ``<version>-dev`` without a sha."""
    version = (package_version or "").strip()
    if not version:
        raise PipelineClientError("cannot name the pipeline version: the package version is empty")
    sha = (git_sha or "").strip()
    return f"{version}-{sha or 'dev'}"


def _pins_a_commit(version_name: str) -> bool:
    """Whether the name identifies exactly one source tree (not ``-dirty``/``-dev``)."""
    return not version_name.endswith(("-dirty", "-dev"))


# ------------------------------------------------------------------------- client


def make_client(host: str, namespace: str | None = None, existing_token: str | None = None) -> Any:
    """A ``kfp.Client`` talking to ``host`` (e.g. ``http://127.0.0.1:8888``).

    An empty ``host`` falls back to ``$KFP_HOST`` (so the error message's
    advice holds however the CLI wires its ``--host`` default).
    With an explicit host, kfp.Client neither loads a kubeconfig nor looks for
    in-cluster credentials. A host without a scheme gets ``https://`` (kfp's
    own default, made explicit so error messages show the real URL).

    Unless a namespace is given, the constructor asks ``/apis/v2beta1/healthz``
    whether the server is multi-user; stock kfp retries that 5 times with 5 s
    sleeps on any HTTP error (a 401 from a bad token costs 25 s). The client
    returned here asks once and fails fast with a PipelineClientError.
    """
    url = _normalise_host(host or os.environ.get(KFP_HOST_ENV))
    kwargs: dict[str, Any] = {"host": url, "existing_token": existing_token or None}
    if namespace:
        kwargs["namespace"] = namespace
    with _server_call(url, "connection check (healthz)"), warnings.catch_warnings():
        # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later"
        warnings.simplefilter("ignore", FutureWarning)
        return _fast_fail_client_class()(**kwargs)


def _normalise_host(host: str | None) -> str:
    """Validate the host and give it a scheme; the error tells how to set it."""
    text = (host or "").strip().rstrip("/")
    if not text:
        raise PipelineClientError(
            "no KFP API host: pass --host or set KFP_HOST "
            "(e.g. http://127.0.0.1:8888 after `kubectl port-forward svc/ml-pipeline 8888`)"
        )
    if "://" not in text:
        text = f"https://{text}"
    if not text.startswith(("http://", "https://")):
        raise PipelineClientError(f"KFP host {host!r} must be an http:// or https:// URL")
    return text


@functools.cache
def _fast_fail_client_class() -> type:
    """kfp.Client whose healthz probe tries once (see :func:`make_client`)."""
    import kfp

    class _FastFailClient(kfp.Client):
        def get_kfp_healthz(self, sleep_duration: int = 0) -> Any:  # noqa: ARG002
            return self._healthz_api.healthz_service_get_healthz()

    return _FastFailClient


def _client_host(client: Any) -> str:
    """The URL a kfp.Client talks to, for error messages."""
    config = getattr(client, "_existing_config", None)
    return getattr(config, "host", None) or "<unknown KFP host>"


@contextlib.contextmanager
def _server_call(host: str, operation: str) -> Iterator[None]:
    """Turn kfp/HTTP failures into one-line PipelineClientErrors.

    Also sends kfp's "Experiment details: <link>" prints to stderr, so the
    CLI's stdout carries only the ids it means to print.
    """
    import kfp_server_api
    import urllib3

    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except PipelineClientError:
        raise
    except kfp_server_api.ApiException as exc:
        raise _api_error(host, operation, exc) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PipelineClientError(f"KFP {operation} failed: cannot reach {host}: {reason}") from exc
    except ValueError as exc:  # kfp's own checks, e.g. two pipelines with one name
        raise PipelineClientError(f"KFP {operation} on {host} failed: {exc}") from exc


def _api_error(host: str, operation: str, exc: Any) -> PipelineClientError:
    """Message for an HTTP error answer: status, server message, a hint."""
    status = int(getattr(exc, "status", 0) or 0)
    if status == 0:  # TLS failure or an unpreparable request: no HTTP answer
        return PipelineClientError(f"KFP {operation} failed: cannot reach {host}: {exc.reason}")
    detail = _server_message(getattr(exc, "body", None)) or (exc.reason or "")
    hints = {
        401: " (check the token)",
        403: " (check the token and --namespace)",
        404: " (is the host the KFP API endpoint, e.g. the ml-pipeline service?)",
    }
    return PipelineClientError(
        f"KFP {operation} failed on {host}: HTTP {status}: {detail}{hints.get(status, '')}",
        status=status,
    )


def _server_message(body: Any) -> str:
    """The human part of a KFP error body (JSON ``message``/``error``), else raw text."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return str(body).strip()[:300]
    if isinstance(data, dict):
        for key in ("message", "error_message", "error"):
            if data.get(key):
                return str(data[key])
    return str(body).strip()[:300]


# ------------------------------------------------------------------------- upload


def upload(
    client: Any,
    package_path: str | Path,
    pipeline_name: str,
    version_name: str,
    description: str | None = None,
) -> dict[str, Any]:
    """Upload ``package_path`` as version ``version_name`` of ``pipeline_name``.

    Creates the pipeline when missing. A version with the same name already
    there is returned as is (``created: False``): re-uploading the same commit
    is a no-op. That shortcut is refused for ``-dirty``/``-dev`` names, which
    do not identify one source tree: the stored version may hold other code.

    The pipeline is created empty (``POST /apis/v2beta1/pipelines``) and the
    package then uploaded as a version, rather than through
    ``Client.upload_pipeline``: that endpoint names the first version after the
    pipeline, which would break the one-version-per-commit naming.

    Returns ``{"pipeline_id", "version_id", "version_name", "created"}``.
    """
    package = _check_package(package_path)
    _require_text(pipeline_name, "pipeline name")
    _require_text(version_name, "pipeline version name")
    host = _client_host(client)
    pipeline_id = _find_pipeline_id(client, host, pipeline_name)
    if pipeline_id is None:
        pipeline_id = _create_pipeline(client, host, pipeline_name, description)
    existing = _find_version(client, host, pipeline_id, version_name)
    if existing is None:
        try:
            with _server_call(host, f"upload of pipeline version {version_name!r}"):
                created = client.upload_pipeline_version(
                    str(package), version_name, pipeline_id=pipeline_id, description=description
                )
            return _upload_result(pipeline_id, created.pipeline_version_id, version_name, True)
        except PipelineClientError as err:
            # 409: someone uploaded the same name between our lookup and upload.
            if err.status != 409:
                raise
            existing = _find_version(client, host, pipeline_id, version_name)
            if existing is None:
                raise
    if not _pins_a_commit(version_name):
        raise PipelineClientError(
            f"pipeline version {version_name!r} of {pipeline_name!r} already exists on {host} "
            f"(id {existing.pipeline_version_id}), and its name pins no commit, so it may hold "
            f"other code than {package}; commit your changes (the name then carries the new sha) "
            "or choose another version name"
        )
    return _upload_result(pipeline_id, existing.pipeline_version_id, version_name, False)


def _upload_result(
    pipeline_id: str, version_id: str, version_name: str, created: bool
) -> dict[str, Any]:
    """The dict :func:`upload` returns (kept in one place so both paths agree)."""
    return {
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "version_name": version_name,
        "created": created,
    }


def _find_pipeline_id(client: Any, host: str, name: str) -> str | None:
    """Id of the pipeline whose display name is ``name``, if any."""
    with _server_call(host, f"lookup of pipeline {name!r}"):
        return client.get_pipeline_id(name)


def _create_pipeline(client: Any, host: str, name: str, description: str | None) -> str:
    """Create an empty pipeline; on a 409 (lost race) use the winner's."""
    import kfp_server_api

    body = kfp_server_api.V2beta1Pipeline(display_name=name, description=description)
    try:
        with _server_call(host, f"creation of pipeline {name!r}"):
            return client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id
    except PipelineClientError as err:
        winner = _find_pipeline_id(client, host, name) if err.status == 409 else None
        if winner is None:
            raise
        return winner


def _find_version(client: Any, host: str, pipeline_id: str, name: str) -> Any | None:
    """The version of ``pipeline_id`` named ``name``, if any.

    Filters server-side and checks the name again client-side, paging, so a
    server that ignores the filter still gives the right answer.
    """
    name_filter = _display_name_filter(name)
    token = ""
    with _server_call(host, f"lookup of pipeline version {name!r}"):
        for _ in range(1000):  # a bound, in case a server repeats its page token
            page = client.list_pipeline_versions(
                pipeline_id, page_token=token, page_size=100, filter=name_filter
            )
            for version in page.pipeline_versions or []:
                if version.display_name == name:
                    return version
            token = page.next_page_token or ""
            if not token:
                break
    return None


def _display_name_filter(name: str) -> str:
    """A KFP list filter (JSON ``Filter`` proto) for display_name == name."""
    predicate = {"operation": "EQUALS", "key": "display_name", "stringValue": name}
    return json.dumps({"predicates": [predicate]})


_PACKAGE_SUFFIXES = (".yaml", ".yml", ".zip", ".tar.gz", ".tgz")


def _check_package(package_path: str | Path) -> Path:
    """Fail before any request if the package is missing or of a kind kfp rejects."""
    path = Path(package_path)
    if not path.is_file():
        raise PipelineClientError(f"pipeline package {str(path)!r} does not exist (compile it first)")
    if not path.name.endswith(_PACKAGE_SUFFIXES):
        raise PipelineClientError(
            f"pipeline package {str(path)!r} must end with one of {', '.join(_PACKAGE_SUFFIXES)}"
        )
    return path


def _require_text(value: str | None, what: str) -> None:
    """Empty names would reach the server and come back as an opaque 400."""
    if not value or not str(value).strip():
        raise PipelineClientError(f"the {what} is empty")


# ------------------------------------------------------------------------- submit


def submit(
    client: Any,
    *,
    experiment: str,
    run_name: str,
    arguments: Mapping[str, Any] | None,
    package_path: str | Path | None = None,
    pipeline_id: str | None = None,
    version_id: str | None = None,
    service_account: str | None = None,
    enable_caching: bool | None = None,
) -> str:
    """Start one run, from a package file or a pinned uploaded version; return its id.

    ``arguments`` become the run's runtime-config parameters. The experiment
    is created when missing. ``enable_caching`` only works with a package: kfp
    rewrites the caching options of the spec it sends, whereas a stored
    version keeps the caching it was compiled with, so asking for it with a
    pinned version is refused instead of silently ignored.
    """
    _require_text(experiment, "experiment name")
    _require_text(run_name, "run name")
    package = _run_source(package_path, pipeline_id, version_id)
    if enable_caching is not None and package is None:
        raise PipelineClientError(
            "enable_caching only applies when submitting a package file; an uploaded version "
            "keeps the caching it was compiled with (recompile with the caching you want)"
        )
    params = _json_arguments(arguments)
    host = _client_host(client)
    experiment_id = _ensure_experiment(client, host, experiment)
    with _server_call(host, f"submission of run {run_name!r}"):
        run = client.run_pipeline(
            experiment_id=experiment_id,
            job_name=run_name,
            pipeline_package_path=str(package) if package else None,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            enable_caching=enable_caching,
            service_account=service_account,
        )
    if not run.run_id:
        raise PipelineClientError(f"KFP submission of run {run_name!r} on {host} returned no run id")
    return run.run_id


def _run_source(
    package_path: str | Path | None, pipeline_id: str | None, version_id: str | None
) -> Path | None:
    """Exactly one of: a package file, or a pipeline id *and* a version id."""
    pinned = bool(pipeline_id) or bool(version_id)
    if package_path and pinned:
        raise PipelineClientError("give either a package file or a pipeline/version id, not both")
    if package_path:
        return _check_package(package_path)
    if not (pipeline_id and version_id):
        raise PipelineClientError(
            "nothing to run: give a package file, or both a pipeline id and a version id"
        )
    return None


def _json_arguments(arguments: Mapping[str, Any] | None) -> dict[str, Any]:
    """Pipeline arguments as a plain dict; refuse values JSON cannot carry.

    Checked here because kfp would otherwise fail deep inside its HTTP layer
    with a TypeError (e.g. for a ``Path`` value).
    """
    params = dict(arguments or {})
    try:
        json.dumps(params)
    except (TypeError, ValueError) as exc:
        raise PipelineClientError(
            f"pipeline arguments must be JSON values (str, number, bool, list, dict): {exc}"
        ) from exc
    return params


def _ensure_experiment(client: Any, host: str, name: str) -> str:
    """Id of experiment ``name``, creating it when missing (409 → it exists now)."""
    import kfp_server_api

    with _server_call(host, f"lookup/creation of experiment {name!r}"):
        try:
            experiment = client.create_experiment(name=name)  # kfp: get, else create
        except kfp_server_api.ApiException as exc:
            if exc.status != 409:
                raise
            experiment = client.get_experiment(experiment_name=name)
    return experiment.experiment_id


# ----------------------------------------------------------------------- schedule


def schedule(
    client: Any,
    *,
    experiment: str,
    job_name: str,
    cron: str,
    pipeline_id: str,
    version_id: str,
    arguments: Mapping[str, Any] | None,
    max_concurrency: int = 1,
    no_catchup: bool = True,
    service_account: str | None = None,
    enabled: bool = True,
) -> str:
    """Create a cron recurring run of a pinned pipeline version; return its id.

    All local checks (cron, concurrency, version pin, arguments) run before
    the first request. A recurring run with the same name in the experiment
    is refused: KFP cannot update one in place (kfp #3789), and a second one
    would fire alongside the first. See the module docstring for why the
    version is pinned and why ``max_concurrency=1``/``no_catchup=True``.
    """
    cron_expression = validate_cron(cron)
    _require_text(experiment, "experiment name")
    _require_text(job_name, "recurring run name")
    _check_max_concurrency(max_concurrency)
    if not (pipeline_id and version_id):
        raise PipelineClientError(
            "a recurring run needs a pipeline id and a pinned version id; without a version "
            "KFP runs whichever version was uploaded last"
        )
    params = _json_arguments(arguments)
    host = _client_host(client)
    experiment_id = _ensure_experiment(client, host, experiment)
    _refuse_duplicate_schedule(client, host, experiment, experiment_id, job_name)
    with _server_call(host, f"creation of recurring run {job_name!r}"):
        recurring = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=job_name,
            cron_expression=cron_expression,
            max_concurrency=max_concurrency,
            no_catchup=no_catchup,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            enabled=enabled,
            service_account=service_account,
        )
    if not recurring.recurring_run_id:
        raise PipelineClientError(
            f"KFP creation of recurring run {job_name!r} on {host} returned no id"
        )
    return recurring.recurring_run_id


def _check_max_concurrency(value: Any) -> None:
    """1..10: the range the v2beta1 RecurringRun proto documents for the server."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
        raise PipelineClientError(
            f"max_concurrency must be an integer from 1 to 10 (got {value!r}); "
            "1 keeps scheduled runs from overlapping"
        )


def _refuse_duplicate_schedule(
    client: Any, host: str, experiment: str, experiment_id: str, job_name: str
) -> None:
    """Raise if the experiment already holds a recurring run named ``job_name``."""
    name_filter = _display_name_filter(job_name)
    token = ""
    with _server_call(host, f"lookup of recurring run {job_name!r}"):
        for _ in range(1000):
            page = client.list_recurring_runs(
                page_token=token, page_size=100, experiment_id=experiment_id, filter=name_filter
            )
            for recurring in page.recurring_runs or []:
                if recurring.display_name == job_name:
                    raise PipelineClientError(
                        f"recurring run {job_name!r} already exists in experiment {experiment!r} "
                        f"on {host} (id {recurring.recurring_run_id}); KFP cannot update a "
                        "recurring run, so delete it first (KFP UI, or "
                        "kfp.Client.delete_recurring_run) or choose another name"
                    )
            token = page.next_page_token or ""
            if not token:
                return
