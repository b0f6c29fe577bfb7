"""flowgrpo.storage against a real S3 HTTP endpoint (moto's server on 127.0.0.1, behind a small fault-injecting
proxy) and against local paths: transfers (multipart too), listing, publish + verify, tampering, retries,
and no credentials in errors or logs."""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flowgrpo import storage
from flowgrpo.storage import MANIFEST, MARKER, MiB, IncompleteError, IntegrityError, NotFoundError, StorageError

KEY_ID = "AKIAFLOWGRPOTESTKEY01"
SECRET = "flowgrpo/test+secret-NEVER-LOGGED-0123456789"
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message><RequestId>x</RequestId></Error>")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of moto that can fail the next N matching requests with
    ``503 SlowDown`` or by dropping the connection, and records every request it sees."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.fail, self.mode, self.match = 0, "slowdown", ""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                with proxy.lock:
                    proxy.requests.append((self.command, self.path))
                    failing = proxy.fail > 0 and proxy.match in f"{self.command} {self.path}"
                    if failing:
                        proxy.fail -= 1
                if failing and proxy.mode == "reset":
                    self.close_connection = True  # no response at all: the client sees a dropped connection
                    return
                if failing:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN)
                    return
                skip = {"transfer-encoding", "connection", "content-length", "expect"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in {"transfer-encoding", "connection", "content-length", "server", "date"}:
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail_next(self, n: int, mode: str = "slowdown", match: str = "") -> None:
        with self.lock:
            self.fail, self.mode, self.match = n, mode, match

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def moto_port():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield port
    server.stop()


@pytest.fixture(scope="module")
def proxy(moto_port):
    p = FaultProxy(moto_port)
    yield p
    p.close()


def _fake_aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL",
                "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def small_parts():
    """5 MiB multipart threshold/parts (the S3 minimum), fast backoff; restored afterwards."""
    prev = storage.configure(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4,
                             backoff_s=0.01)
    yield
    storage.configure(prev)


@pytest.fixture
def bucket(proxy, monkeypatch, small_parts) -> str:
    """A fresh bucket, reached through the proxy: ``s3://<bucket>``."""
    import boto3

    _fake_aws_env(monkeypatch, proxy.url)
    name = f"b-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=proxy.url).create_bucket(Bucket=name)
    proxy.fail_next(0)
    proxy.requests.clear()
    return f"s3://{name}"


@pytest.fixture(params=["s3", "local"])
def base(request, tmp_path, small_parts) -> str:
    """The same tests on S3 and on a local path."""
    if request.param == "s3":
        return request.getfixturevalue("bucket") + "/data/run-1"
    return str(tmp_path / "store" / "run-1")


def _tree(root: Path, big: bool = False) -> dict[str, bytes]:
    files = {"a.txt": b"hello\n", "sub/b.bin": os.urandom(1000), "sub/deeper/c.json": b'{"x": 1}',
             "empty": b""}
    if big:
        files["sub/big.bin"] = os.urandom(11 * MiB + 123)  # 3 parts of 5 MiB
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ basics
def test_dir_roundtrip_nested_and_multipart(base, tmp_path):
    src = tmp_path / "src"
    files = _tree(src, big=True)
    assert storage.upload_dir(src, base) == len(files)
    assert storage.list_files(base) == {rel: len(d) for rel, d in files.items()}
    dest = tmp_path / "dest"
    assert storage.download_dir(base, dest) == len(files)
    assert _read_tree(dest) == files
    storage.download_file(storage.join(base, "sub/big.bin"), tmp_path / "one.bin")
    assert (tmp_path / "one.bin").read_bytes() == files["sub/big.bin"]
    if storage.is_s3(base):  # the big file really went up in parts
        import boto3

        bucket, _, key = base[len("s3://"):].partition("/")
        head = boto3.client("s3").head_object(Bucket=bucket, Key=f"{key}/sub/big.bin")
        assert head["ETag"].strip('"').endswith("-3")


def test_exists_list_read_write_delete(base, tmp_path):
    src = tmp_path / "src"
    _tree(src)
    storage.upload_dir(src, base)
    assert storage.exists(base) and storage.exists(storage.join(base, "sub"))
    assert storage.exists(storage.join(base, "sub/b.bin"))
    assert not storage.exists(storage.join(base, "su")) and not storage.exists(storage.join(base, "nope"))
    assert storage.list_dirs(base) == ["sub"]
    assert storage.list_dirs(storage.join(base, "sub")) == ["deeper"]
    storage.write_json(storage.join(base, "meta/info.json"), {"step": 3})
    assert storage.read_json(storage.join(base, "meta/info.json")) == {"step": 3}
    storage.write_text(storage.join(base, "note.txt"), "v1")
    storage.write_text(storage.join(base, "note.txt"), "v2")
    assert storage.read_text(storage.join(base, "note.txt")) == "v2"
    with pytest.raises(NotFoundError, match="nope.txt"):
        storage.read_text(storage.join(base, "nope.txt"))
    storage.delete(storage.join(base, "sub"))
    assert not storage.exists(storage.join(base, "sub")) and storage.exists(storage.join(base, "a.txt"))
    storage.delete(storage.join(base, "a.txt"))
    assert sorted(storage.list_files(base)) == ["empty", "meta/info.json", "note.txt"]
    storage.delete(base)
    storage.delete(base)  # missing: not an error
    assert not storage.exists(base) and storage.list_files(base) == {}


def test_file_uri_is_a_local_path(tmp_path):
    src = tmp_path / "src"
    files = _tree(src)
    uri = f"file://{tmp_path}/pub/x"
    storage.publish_dir(src, uri)
    assert (tmp_path / "pub" / "x" / MARKER).is_file()
    assert set(storage.verify(uri)["files"]) == set(files)


# ------------------------------------------------------------------------------------------ publish / verify
def test_publish_verify_and_download(base, tmp_path, proxy):
    src = tmp_path / "src"
    files = _tree(src, big=True)
    (src / MARKER).write_text("stale")  # leftovers in the source are not part of the manifest
    storage.write_text(storage.join(base, "old-file"), "from an earlier publish")
    manifest = storage.publish_dir(src, base)
    assert set(manifest["files"]) == set(files)
    assert manifest["files"]["sub/b.bin"]["size"] == 1000
    assert not storage.exists(storage.join(base, "old-file"))  # the destination was replaced
    assert storage.read_json(storage.join(base, MANIFEST)) == manifest
    assert storage.is_complete(base)
    assert storage.verify(base) == manifest
    if storage.is_s3(base):  # the marker is the last object written
        puts = [path for method, path in proxy.requests if method in ("PUT", "POST")]
        assert puts[-1].endswith(f"/{MARKER}") and puts[-2].endswith(f"/{MANIFEST}")
    dest = tmp_path / "cache" / "copy"
    assert storage.download_published(base, dest) == manifest
    assert {k: v for k, v in _read_tree(dest).items() if k not in (MANIFEST, MARKER)} == files
    storage.verify(dest)  # the local copy is published too
    storage.download_published(base, dest)  # verified cache hit
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]


def test_republish_replaces_content_atomically_locally(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a)
    (b / "only-b").parent.mkdir(parents=True)
    (b / "only-b").write_text("b")
    dest = tmp_path / "pub" / "step-1"
    storage.publish_dir(a, dest, move=True)
    assert not a.exists() and storage.verify(dest)
    storage.publish_dir(b, dest)
    assert set(storage.verify(dest)["files"]) == {"only-b"} and not (dest / "a.txt").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["step-1"]  # no temporary leftovers


def test_tampering_and_partial_publishes_are_detected(base, tmp_path):
    src = tmp_path / "src"
    files = _tree(src)
    storage.publish_dir(src, base)
    target = storage.join(base, "sub/b.bin")
    storage.write_bytes(target, bytes(1000))  # same size, other content
    storage.verify(base, deep=False)  # sizes still match ...
    with pytest.raises(IntegrityError, match="sha256 mismatch for sub/b.bin"):
        storage.verify(base)  # ... the hashes do not
    dest = tmp_path / "dl"
    with pytest.raises(IntegrityError, match="sub/b.bin"):
        storage.download_published(base, dest)
    assert not dest.exists()
    storage.write_bytes(target, b"short")
    with pytest.raises(IntegrityError, match="sub/b.bin has 5 bytes"):
        storage.verify(base, deep=False)
    storage.write_bytes(target, files["sub/b.bin"])
    storage.verify(base)
    # a manifest edited after publishing no longer matches the marker
    manifest = storage.read_json(storage.join(base, MANIFEST))
    manifest["files"]["sub/b.bin"]["sha256"] = "0" * 64
    storage.write_json(storage.join(base, MANIFEST), manifest)
    with pytest.raises(IntegrityError, match="does not match"):
        storage.verify(base, deep=False)
    storage.write_bytes(storage.join(base, MANIFEST), b"{not json")
    with pytest.raises(IntegrityError):
        storage.verify(base, deep=False)
    storage.publish_dir(src, base)
    storage.delete(storage.join(base, "a.txt"))
    with pytest.raises(IntegrityError, match="a.txt is missing"):
        storage.verify(base, deep=False)
    storage.delete(storage.join(base, MARKER))  # e.g. an upload killed before its marker
    assert not storage.is_complete(base)
    with pytest.raises(IncompleteError, match="no _COMPLETE marker"):
        storage.verify(base)


# ------------------------------------------------------------------------------------------ retries / errors
def test_throttling_and_dropped_connections_are_retried(bucket, tmp_path, proxy):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(6 * MiB))  # multipart: the faults hit part uploads too
    uri = f"{bucket}/retry/f.bin"
    proxy.fail_next(2, "slowdown")  # botocore's own retries (throttling backoff)
    storage.upload_file(src, uri)
    assert len(proxy.requests) >= 5  # 2 refused + create, 2 parts, complete
    storage.configure(max_attempts=1)  # now only our retry layer stands between faults and the caller
    proxy.requests.clear()
    proxy.fail_next(2, "reset", match="GET")
    storage.download_file(uri, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    proxy.fail_next(2, "slowdown", match="PUT")
    storage.upload_file(src, f"{bucket}/retry/g.bin")
    proxy.fail_next(1, "reset")
    assert storage.list_files(f"{bucket}/retry") == {"f.bin": 6 * MiB, "g.bin": 6 * MiB}
    assert proxy.fail == 0


def test_persistent_errors_name_the_uri_never_credentials(bucket, tmp_path, proxy, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="flowgrpo")
    storage.configure(max_attempts=2, transfer_attempts=2)
    src = tmp_path / "f.txt"
    src.write_text("x")
    uri = f"{bucket}/stuck/f.txt"
    proxy.fail_next(10**6, "slowdown")
    with pytest.raises(StorageError) as e:
        storage.upload_file(src, uri)
    proxy.fail_next(0)
    errors = [e.value]
    assert uri in str(e.value) and "SlowDown" in str(e.value) and "after 2 attempts" in str(e.value)
    assert e.value.uri == uri
    assert "retrying" in caplog.text and uri in caplog.text
    with pytest.raises(NotFoundError) as e:  # not retried
        storage.read_bytes(f"{bucket}-missing/x")
    errors.append(e.value)
    assert f"{bucket}-missing/x" in str(e.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(StorageError, match="after 2 attempts") as e:
        storage.list_files(f"{bucket}/stuck")
    errors.append(e.value)
    assert f"{bucket}/stuck" in str(e.value)
    texts = [caplog.text] + ["".join(traceback.format_exception(err)) for err in errors]
    for text in texts:
        assert KEY_ID not in text and SECRET not in text


def test_endpoint_from_mlflow_variable_and_redaction(bucket, proxy, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.url)  # MinIO deployments set only this one
    storage.write_text(f"{bucket}/m.txt", "minio")
    assert storage.read_text(f"{bucket}/m.txt") == "minio"
    url = f"https://h/k?X-Amz-Credential={KEY_ID}%2F2024&X-Amz-Signature=abc123&x=1 http://user:pw@host/"
    red = storage.redact(f"{url} {SECRET}")
    assert KEY_ID not in red and SECRET not in red and "abc123" not in red and "pw@" not in red
    assert "x=1" in red
