"""A fake Kubeflow Pipelines API server for tests (real HTTP on 127.0.0.1).

It implements the v2beta1 REST endpoints that kfp 2.17's ``kfp.Client`` uses
for upload / submit / schedule, with in-memory state, and records every
request so tests can assert on exactly what the client sent. Being a real
HTTP server (not a mock of ``kfp_server_api``) means the tests exercise kfp's
own request building, multipart encoding and response parsing.

Behaviour copied from the real backend where tests depend on it:
``/pipelines/upload`` names the first version after the pipeline; duplicate
pipeline or version names answer 409; errors are JSON ``{code, message}``.

Faults: :meth:`FakeKfpServer.fail` makes matching requests answer an HTTP
error, optionally after applying them (a lost race: the state changes but the
caller sees a 409).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

_API = "/apis/v2beta1"
# grpc status codes used in error bodies (the REST gateway sends them along).
_GRPC_CODE = {400: 3, 404: 5, 409: 6, 500: 13, 503: 14}


@dataclass
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any = None  # parsed JSON body, or None
    files: dict[str, str] = field(default_factory=dict)  # multipart field -> file name
    file_bytes: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    status: int
    message: str
    times: int | None  # None: every matching request
    apply: bool


class ApiError(Exception):
    """Raised by handlers; becomes a JSON error answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKfpServer:
    """In-memory KFP API server; use :meth:`start`/:meth:`stop` (or a fixture)."""

    def __init__(self, *, multi_user: bool = False) -> None:
        self.multi_user = multi_user
        self.requests: list[RecordedRequest] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}  # version id -> version
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}
        self._faults: list[_Fault] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
            ("GET", re.compile(rf"{_API}/healthz"), self._healthz),
            ("POST", re.compile(rf"{_API}/pipelines/upload"), self._upload_pipeline),
            ("POST", re.compile(rf"{_API}/pipelines/upload_version"), self._upload_version),
            ("GET", re.compile(rf"{_API}/pipelines"), self._list_pipelines),
            ("POST", re.compile(rf"{_API}/pipelines"), self._create_pipeline),
            ("GET", re.compile(rf"{_API}/pipelines/(?P<pid>[^/]+)"), self._get_pipeline),
            ("GET", re.compile(rf"{_API}/pipelines/(?P<pid>[^/]+)/versions"), self._list_versions),
            (
                "GET",
                re.compile(rf"{_API}/pipelines/(?P<pid>[^/]+)/versions/(?P<vid>[^/]+)"),
                self._get_version,
            ),
            ("GET", re.compile(rf"{_API}/experiments"), self._list_experiments),
            ("POST", re.compile(rf"{_API}/experiments"), self._create_experiment),
            ("GET", re.compile(rf"{_API}/experiments/(?P<eid>[^/]+)"), self._get_experiment),
            ("POST", re.compile(rf"{_API}/runs"), self._create_run),
            ("GET", re.compile(rf"{_API}/runs/(?P<rid>[^/]+)"), self._get_run),
            ("GET", re.compile(rf"{_API}/recurringruns"), self._list_recurring_runs),
            ("POST", re.compile(rf"{_API}/recurringruns"), self._create_recurring_run),
        ]

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123``."""
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKfpServer:
        """Listen on an ephemeral port in a daemon thread."""
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    # ------------------------------------------------------------ test helpers

    def fail(
        self,
        method: str,
        path: str,
        status: int,
        message: str = "injected failure",
        *,
        times: int | None = 1,
        apply: bool = False,
    ) -> None:
        """Answer ``status`` to requests whose path fully matches regex ``path``.

        ``apply=True`` handles the request first (state changes), then answers
        the error: the shape of a race lost to a concurrent client.
        """
        self._faults.append(_Fault(method.upper(), re.compile(path), status, message, times, apply))

    def api_requests(self) -> list[RecordedRequest]:
        """Requests other than the constructor's healthz probe."""
        return [r for r in self.requests if not r.path.endswith("/healthz")]

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        """Recorded requests with this method and exact path."""
        return [r for r in self.requests if r.method == method and r.path == path]

    def add_pipeline(self, display_name: str, version_names: tuple[str, ...] = ()) -> str:
        """Seed a pipeline (and versions) directly; returns the pipeline id."""
        pipeline = self._new_pipeline(display_name, "")
        for name in version_names:
            self._new_version(pipeline["pipeline_id"], name, "", {})
        return pipeline["pipeline_id"]

    # ------------------------------------------------------------ dispatch

    def handle(self, request: RecordedRequest) -> tuple[int, Any]:
        """Route one request; returns (status, JSON-able body)."""
        with self._lock:
            self.requests.append(request)
            fault = self._take_fault(request)
            try:
                if fault is None or fault.apply:
                    result = self._dispatch(request)
                if fault is not None:
                    raise ApiError(fault.status, fault.message)
                return 200, result
            except ApiError as err:
                code = _GRPC_CODE.get(err.status, 2)
                body = {"error": err.message, "code": code, "message": err.message, "details": []}
                return err.status, body

    def _take_fault(self, request: RecordedRequest) -> _Fault | None:
        for fault in self._faults:
            if fault.method == request.method and fault.path.fullmatch(request.path):
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    def _dispatch(self, request: RecordedRequest) -> Any:
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if method == request.method and match:
                return handler(request, **match.groupdict())
        raise ApiError(404, f"fake KFP server: no route for {request.method} {request.path}")

    def _next_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    # ------------------------------------------------------------ healthz

    def _healthz(self, request: RecordedRequest) -> Any:
        return {"multi_user": self.multi_user, "pipeline_store": "database"}

    # ------------------------------------------------------------ pipelines

    def _new_pipeline(self, display_name: str, description: str, namespace: str = "") -> dict[str, Any]:
        if any(p["display_name"] == display_name for p in self.pipelines.values()):
            raise ApiError(409, f"Failed to create a pipeline: pipeline {display_name!r} already exists")
        pipeline = {
            "pipeline_id": self._next_id("pipeline"),
            "display_name": display_name,
            "name": display_name,
            "description": description,
            "namespace": namespace,
            "created_at": _now(),
        }
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        return pipeline

    def _new_version(self, pipeline_id: str, name: str, description: str, spec: Any) -> dict[str, Any]:
        if pipeline_id not in self.pipelines:
            raise ApiError(400, "Failed to create a pipeline version: pipeline not found")
        siblings = (v for v in self.versions.values() if v["pipeline_id"] == pipeline_id)
        if any(v["display_name"] == name for v in siblings):
            raise ApiError(409, "Failed to create a pipeline version")
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": self._next_id("version"),
            "display_name": name,
            "name": name,
            "description": description,
            "created_at": _now(),
            "pipeline_spec": spec,
        }
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _upload_pipeline(self, request: RecordedRequest) -> Any:
        spec = _uploaded_spec(request)
        name = _uploaded_name(request)
        query = request.query
        pipeline = self._new_pipeline(name, query.get("description", ""), query.get("namespace", ""))
        # Like the real backend: the first version is named after the pipeline.
        self._new_version(pipeline["pipeline_id"], name, pipeline["description"], spec)
        return pipeline

    def _upload_version(self, request: RecordedRequest) -> Any:
        spec = _uploaded_spec(request)
        pipeline_id = request.query.get("pipelineid", "")
        if not pipeline_id:
            raise ApiError(400, "Failed to create a pipeline version: missing pipelineid")
        name = _uploaded_name(request)
        return self._new_version(pipeline_id, name, request.query.get("description", ""), spec)

    def _create_pipeline(self, request: RecordedRequest) -> Any:
        body = request.body or {}
        name = body.get("display_name") or body.get("name")
        if not name:
            raise ApiError(400, "Invalid input error: pipeline name is required")
        return self._new_pipeline(name, body.get("description", ""), body.get("namespace", ""))

    def _get_pipeline(self, request: RecordedRequest, pid: str) -> Any:
        return self._lookup(self.pipelines, pid, "pipeline")

    def _list_pipelines(self, request: RecordedRequest) -> Any:
        items = _filtered(self.pipelines.values(), request.query.get("filter"))
        return _page(items, request.query, "pipelines")

    def _list_versions(self, request: RecordedRequest, pid: str) -> Any:
        self._lookup(self.pipelines, pid, "pipeline")
        versions = [_without_spec(v) for v in self.versions.values() if v["pipeline_id"] == pid]
        matching = _filtered(versions, request.query.get("filter"))
        return _page(matching, request.query, "pipeline_versions")

    def _get_version(self, request: RecordedRequest, pid: str, vid: str) -> Any:
        version = self._lookup(self.versions, vid, "pipeline version")
        if version["pipeline_id"] != pid:
            raise ApiError(404, f"pipeline version {vid} not found in pipeline {pid}")
        return version

    # ------------------------------------------------------------ experiments

    def _create_experiment(self, request: RecordedRequest) -> Any:
        body = request.body or {}
        name = body.get("display_name")
        if not name:
            raise ApiError(400, "Invalid input error: experiment name is required")
        if any(e["display_name"] == name for e in self.experiments.values()):
            raise ApiError(409, f"Failed to create an experiment: {name!r} already exists")
        experiment = {
            "experiment_id": self._next_id("experiment"),
            "display_name": name,
            "description": body.get("description") or "",
            "namespace": body.get("namespace") or "",
            "created_at": _now(),
            "storage_state": "AVAILABLE",
        }
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _list_experiments(self, request: RecordedRequest) -> Any:
        items = _filtered(self.experiments.values(), request.query.get("filter"))
        return _page(items, request.query, "experiments")

    def _get_experiment(self, request: RecordedRequest, eid: str) -> Any:
        return self._lookup(self.experiments, eid, "experiment")

    # ------------------------------------------------------------ runs

    def _check_template(self, body: dict[str, Any]) -> None:
        """A run or recurring run needs exactly one of a spec or a version reference."""
        self._lookup(self.experiments, body.get("experiment_id", ""), "experiment")
        spec = body.get("pipeline_spec")
        ref = body.get("pipeline_version_reference")
        if bool(spec) == bool(ref):
            raise ApiError(
                400, "Invalid input error: need exactly one of pipeline_spec and pipeline_version_reference"
            )
        if ref:
            version = self._lookup(self.versions, ref.get("pipeline_version_id", ""), "pipeline version")
            if ref.get("pipeline_id") and ref["pipeline_id"] != version["pipeline_id"]:
                raise ApiError(400, "Invalid input error: version does not belong to the pipeline")

    def _create_run(self, request: RecordedRequest) -> Any:
        body = dict(request.body or {})
        if not body.get("display_name"):
            raise ApiError(400, "Invalid input error: run name is required")
        self._check_template(body)
        run = {**body, "run_id": self._next_id("run"), "state": "PENDING", "created_at": _now()}
        self.runs[run["run_id"]] = run
        return run

    def _get_run(self, request: RecordedRequest, rid: str) -> Any:
        return self._lookup(self.runs, rid, "run")

    def _create_recurring_run(self, request: RecordedRequest) -> Any:
        body = dict(request.body or {})
        if not body.get("display_name"):
            raise ApiError(400, "Invalid input error: recurring run name is required")
        self._check_template(body)
        trigger = body.get("trigger") or {}
        cron = (trigger.get("cron_schedule") or {}).get("cron")
        periodic = trigger.get("periodic_schedule")
        if not cron and not periodic:
            raise ApiError(400, "Invalid input error: a trigger is required")
        if not 1 <= int(body.get("max_concurrency") or 0) <= 10:
            raise ApiError(400, "Invalid input error: max_concurrency must be in [1, 10]")
        recurring = {
            **body,
            "recurring_run_id": self._next_id("recurring"),
            "max_concurrency": str(body["max_concurrency"]),  # int64 travels as a string
            "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED",
            "created_at": _now(),
        }
        self.recurring_runs[recurring["recurring_run_id"]] = recurring
        return recurring

    def _list_recurring_runs(self, request: RecordedRequest) -> Any:
        items = list(self.recurring_runs.values())
        if request.query.get("experiment_id"):
            items = [r for r in items if r.get("experiment_id") == request.query["experiment_id"]]
        # The proto field is spelled recurringRuns, so that is its JSON name
        # (kfp_server_api's ListRecurringRunsResponse reads "recurringRuns").
        return _page(_filtered(items, request.query.get("filter")), request.query, "recurringRuns")

    # ------------------------------------------------------------ shared

    @staticmethod
    def _lookup(table: dict[str, dict[str, Any]], key: str, kind: str) -> dict[str, Any]:
        if key not in table:
            raise ApiError(404, f"{kind} {key!r} not found")
        return table[key]


def _uploaded_spec(request: RecordedRequest) -> Any:
    """The uploaded package parsed as YAML (multi-doc: spec, platform spec)."""
    import yaml

    if "uploadfile" not in request.file_bytes:
        raise ApiError(400, "Failed to read pipeline from file")
    try:
        docs = list(yaml.safe_load_all(request.file_bytes["uploadfile"]))
    except yaml.YAMLError as exc:
        raise ApiError(400, f"Failed to read a pipeline spec file: {exc}") from exc
    if not docs or not isinstance(docs[0], dict) or "pipelineInfo" not in docs[0]:
        raise ApiError(400, "Failed to read a pipeline spec file: not a KFP pipeline spec")
    return docs[0]


def _uploaded_name(request: RecordedRequest) -> str:
    """Name of an uploaded pipeline/version: display_name, else name, else file name."""
    query = request.query
    return query.get("display_name") or query.get("name") or request.files["uploadfile"]


def _without_spec(version: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in version.items() if k != "pipeline_spec"}


_EQUALS = (1, "EQUALS")


def _filtered(items: Any, raw_filter: str | None) -> list[dict[str, Any]]:
    """Apply a KFP Filter (JSON); only the EQUALS on string values the client uses."""
    items = list(items)
    if not raw_filter:
        return items
    try:
        predicates = json.loads(raw_filter).get("predicates", [])
    except (ValueError, AttributeError) as exc:
        raise ApiError(400, f"Invalid input error: bad filter {raw_filter!r}") from exc
    for predicate in predicates:
        if predicate.get("operation") not in _EQUALS:
            operation = predicate.get("operation")
            raise ApiError(400, f"fake KFP server: unsupported filter operation {operation!r}")
        key = predicate.get("key")
        value = predicate.get("stringValue", predicate.get("string_value"))
        items = [item for item in items if item.get(key) == value]
    return items


def _page(items: list[dict[str, Any]], query: dict[str, str], key: str) -> dict[str, Any]:
    """Paginate like the server: page_size (default 20) and an opaque page_token."""
    size = int(query.get("page_size") or 20)
    start = int(query.get("page_token") or 0)
    chunk = items[start : start + size]
    answer: dict[str, Any] = {"total_size": len(items)}
    if chunk:
        answer[key] = chunk
    if start + size < len(items):
        answer["next_page_token"] = str(start + size)
    return answer


def _handler_for(server: FakeKfpServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``server``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            self._serve()

        def do_POST(self) -> None:  # noqa: N802
            self._serve()

        def do_DELETE(self) -> None:  # noqa: N802
            self._serve()

        def do_PATCH(self) -> None:  # noqa: N802
            self._serve()

        def _serve(self) -> None:
            request = self._parse()
            status, body = server.handle(request)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _parse(self) -> RecordedRequest:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            request = RecordedRequest(self.command, parts.path, query, headers=headers)
            ctype = self.headers.get("Content-Type", "")
            if ctype.startswith("multipart/form-data"):
                _parse_multipart(ctype, raw, request)
            elif raw:
                try:
                    request.body = json.loads(raw)
                except ValueError:
                    request.body = raw.decode("utf-8", "replace")
            return request

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Silence per-request logging on stderr."""

    return Handler


def _parse_multipart(content_type: str, raw: bytes, request: RecordedRequest) -> None:
    """Fill ``files``/``file_bytes`` from a multipart body (stdlib email parser)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        request.files[name] = part.get_filename() or ""
        request.file_bytes[name] = part.get_payload(decode=True) or b""
