"""One storage API over ``s3://bucket/key`` and local paths (plain or ``file://``).

Primitives: :func:`upload_file` / :func:`download_file`, :func:`upload_dir` / :func:`download_dir`,
:func:`exists`, :func:`list_files` / :func:`list_dirs`, :func:`read_bytes` / :func:`write_bytes` (and the
``_text`` / ``_json`` variants for small objects) and :func:`delete` (an object or a whole prefix).

Published directories (checkpoints, the final model) are written with :func:`publish_dir`:

* ``MANIFEST.json`` inside the directory maps every relative path to its sha256 and size;
* ``_COMPLETE`` is written last and holds the sha256 of the manifest. A directory without it is an
  interrupted publish and is never read; :func:`verify` checks marker, manifest, sizes and (``deep``) hashes.
* S3 has no rename: objects go straight under the destination prefix, after any previous content there
  (marker first) has been deleted; the marker is the commit point. Locally the directory is assembled
  under a temporary name next to the destination, marker included, and moved in place with ``os.replace``.

:func:`download_published` fetches a published directory into a local (cache) directory and checks every
file against the manifest before the local copy gets its own marker.

S3 access uses boto3 with multipart transfers (:class:`S3Settings` -> ``TransferConfig``), botocore retries
(``standard``/``adaptive`` mode) for throttling, 5xx and connection errors, plus a retry with backoff around
each whole transfer. Endpoint and credentials come only from the standard variables: ``AWS_ENDPOINT_URL_S3``
/ ``AWS_ENDPOINT_URL`` (else ``MLFLOW_S3_ENDPOINT_URL``, e.g. MinIO), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``... Errors name the
URI and the S3 error code, never credentials; messages are scrubbed of credential values and signatures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, TypeVar, Union
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

MARKER = "_COMPLETE"
MANIFEST = "MANIFEST.json"
_RESERVED = (MARKER, MANIFEST)
MiB = 1024**2

Location = Union[str, "os.PathLike[str]"]
T = TypeVar("T")


# ------------------------------------------------------------------------------------------ errors
class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI (never credentials)."""

    def __init__(self, message: str, uri: str = ""):
        super().__init__(message)
        self.uri = uri


class NotFoundError(StorageError, FileNotFoundError):
    """No object / file at the URI."""


class IntegrityError(StorageError):
    """A published directory is missing files or does not match its manifest."""


class IncompleteError(IntegrityError):
    """A directory without its ``_COMPLETE`` marker: an interrupted (or still running) publish."""


# ------------------------------------------------------------------------------------------ settings
def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default


@dataclass(frozen=True)
class S3Settings:
    #: files at least this large are uploaded/downloaded in parts (S3 requires parts >= 5 MiB)
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 64 * MiB
    #: threads per file transfer (parts) and files transferred at once by the directory functions
    max_concurrency: int = 8
    file_workers: int = 4
    #: botocore's own retries (per HTTP request): mode "standard" or "adaptive" and total attempts;
    #: defaults from AWS_RETRY_MODE / AWS_MAX_ATTEMPTS
    retry_mode: str = "standard"
    max_attempts: int = 8
    #: our retries around each whole operation (a transfer, a listing...) after botocore gave up
    transfer_attempts: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    connect_timeout_s: float = 20.0
    read_timeout_s: float = 120.0

    @classmethod
    def from_env(cls) -> S3Settings:
        mode = os.environ.get("AWS_RETRY_MODE", "standard")
        return cls(retry_mode=mode if mode in ("standard", "adaptive") else "standard",
                   max_attempts=max(1, _env_int("AWS_MAX_ATTEMPTS", 8)))

    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize, max_concurrency=self.max_concurrency,
                              use_threads=self.max_concurrency > 1)


_settings = S3Settings.from_env()
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def settings() -> S3Settings:
    return _settings


def configure(new: S3Settings | None = None, **changes: Any) -> S3Settings:
    """Replace the S3 settings (``configure(multipart_threshold=8 * MiB)``, or a whole :class:`S3Settings`);
    returns the previous settings so that a caller can restore them."""
    global _settings
    unknown = set(changes) - {f.name for f in fields(S3Settings)}
    if unknown:
        raise TypeError(f"unknown storage settings: {sorted(unknown)}")
    previous = _settings
    _settings = replace(new or _settings, **changes)
    with _clients_lock:
        _clients.clear()
    return previous


# ------------------------------------------------------------------------------------------ locations
def cache_root() -> Path:
    """flowgrpo's local cache root: ``$FLOWGRPO_CACHE`` if set, else ``~/.cache/flowgrpo`` (models, fetched inputs)."""
    env = os.environ.get("FLOWGRPO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "flowgrpo"


def is_s3(uri: Location) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def local_path(uri: Location) -> Path:
    """The local path of a plain path or a ``file://`` URI."""
    if is_s3(uri):
        raise ValueError(f"{uri} is not a local path")
    s = os.fspath(uri)
    if s.startswith("file://"):
        return Path(unquote(urlparse(s).path))
    return Path(s).expanduser()


def join(base: Location, *parts: str) -> Location:
    """``base/part/...``: a string for S3, a :class:`Path` for local locations."""
    if is_s3(base):
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        return f"{str(base).rstrip('/')}/{tail}" if tail else str(base)
    return local_path(base).joinpath(*parts)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"bad S3 URI {uri!r} (expected s3://bucket/key)", uri)
    return bucket, key.strip("/")


def _dir_prefix(key: str) -> str:
    return f"{key}/" if key else ""  # "a/b" must not match "a/bc/..."


# ------------------------------------------------------------------------------------------ secrets
_SIGNED_PARAM = re.compile(r"(?i)((?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId)=)"
                           r"[^&\s'\"]+")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")


def redact(text: str) -> str:
    """``text`` without credential values, URL user-info or presigned-URL signatures."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub(r"\1***@", _SIGNED_PARAM.sub(r"\1***", text))


def _describe(e: BaseException) -> str:
    code = _error_code(e)
    text = redact(str(e)) or type(e).__name__
    return f"{type(e).__name__}: {text}" if not code or code in text else f"{code}: {text}"


# ------------------------------------------------------------------------------------------ client
def _endpoint() -> str | None:
    return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)


def _client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:  # pragma: no cover - boto3 is a dependency
        raise StorageError("s3:// locations need boto3 (pip install boto3)") from e
    endpoint = _endpoint()
    env = tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                            "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION"))
    key = (endpoint, hashlib.sha256(repr(env).encode()).hexdigest(), _settings)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            s = _settings
            config = Config(retries={"mode": s.retry_mode, "max_attempts": s.max_attempts},
                            connect_timeout=s.connect_timeout_s, read_timeout=s.read_timeout_s,
                            max_pool_connections=max(10, s.max_concurrency * s.file_workers),
                            # MinIO and most S3-compatible servers want path-style addressing
                            s3={"addressing_style": "path"} if endpoint else None)
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            _clients[key] = client
    return client


# ------------------------------------------------------------------------------------------ retries
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                "ServiceUnavailableException", "PriorRequestNotComplete", "500", "502", "503", "504", "429",
                "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch"}


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _error_code(e: BaseException) -> str:
    for x in _chain(e):
        resp = getattr(x, "response", None)
        if isinstance(resp, dict) and "Error" in resp:
            return str(resp["Error"].get("Code", ""))
    return ""


def _http_status(e: BaseException) -> int:
    for x in _chain(e):
        resp = getattr(x, "response", None)
        if isinstance(resp, dict):
            return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return 0


def _is_retryable(e: BaseException) -> bool:
    if isinstance(e, StorageError):
        return False
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError
        from s3transfer.exceptions import RetriesExceededError

        transient: tuple = (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError,
                            RetriesExceededError, ConnectionError, TimeoutError)
    except ImportError:  # pragma: no cover
        transient = (ConnectionError, TimeoutError)
    for x in _chain(e):
        if isinstance(x, transient):
            return True
    code, status = _error_code(e), _http_status(e)
    return code in _RETRY_CODES or status >= 500 or status == 429


def _retrying(what: str, uri: str, fn: Callable[[], T]) -> T:
    """``fn()``, retried with exponential backoff on transient errors; failures become :class:`StorageError`
    naming ``what`` and ``uri``."""
    s = _settings
    attempts = max(1, s.transfer_attempts)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:
            if _error_code(e) in _NOT_FOUND:
                raise NotFoundError(f"{what} {uri}: not found ({_describe(e)})", uri) from e
            if not _is_retryable(e):
                raise StorageError(f"{what} {uri} failed: {_describe(e)}", uri) from e
            if attempt == attempts:
                raise StorageError(f"{what} {uri} failed after {attempts} attempts: {_describe(e)}", uri) from e
            delay = min(s.max_backoff_s, s.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning("%s %s: %s; retrying in %.1fs (attempt %d/%d)", what, uri, _describe(e), delay,
                        attempt + 1, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _parallel(fn: Callable[[Any], T], items: list) -> list[T]:
    workers = min(len(items), max(1, _settings.file_workers))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flowgrpo-storage") as ex:
        return list(ex.map(fn, items))


# ------------------------------------------------------------------------------------------ S3 primitives
def _s3_put_file(src: Path, uri: str) -> None:
    bucket, key = _split(uri)
    if not key:
        raise StorageError(f"upload to {uri}: no object key", uri)
    cfg = _settings.transfer_config()
    _retrying("upload to", uri, lambda: _client().upload_file(str(src), bucket, key, Config=cfg))


def _s3_get_file(uri: str, dest: Path) -> None:
    bucket, key = _split(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    cfg = _settings.transfer_config()
    _retrying("download of", uri, lambda: _client().download_file(bucket, key, str(dest), Config=cfg))


def _s3_list(uri: str, delimiter: bool = False) -> tuple[dict[str, int], list[str]]:
    """(relative key -> size, sub-"directory" names) under ``uri`` treated as a directory."""
    bucket, key = _split(uri)
    prefix = _dir_prefix(key)

    def run():
        files: dict[str, int] = {}
        dirs: list[str] = []
        kw = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": "/"} if delimiter else {})}
        for page in _client().get_paginator("list_objects_v2").paginate(**kw):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if rel and not rel.endswith("/"):
                    files[rel] = int(obj["Size"])
            dirs += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return files, dirs

    return _retrying("listing of", uri, run)


def _s3_read(uri: str) -> bytes:
    bucket, key = _split(uri)
    return _retrying("read of", uri, lambda: _client().get_object(Bucket=bucket, Key=key)["Body"].read())


def _s3_write(uri: str, data: bytes) -> None:
    bucket, key = _split(uri)
    _retrying("write of", uri, lambda: _client().put_object(Bucket=bucket, Key=key, Body=data))


def _s3_sha256(uri: str) -> str:
    bucket, key = _split(uri)

    def run():
        h = hashlib.sha256()
        body = _client().get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(MiB):
            h.update(chunk)
        return h.hexdigest()

    return _retrying("read of", uri, run)


def _s3_exists(uri: str) -> bool:
    bucket, key = _split(uri)
    if key:
        try:
            _retrying("lookup of", uri, lambda: _client().head_object(Bucket=bucket, Key=key))
            return True
        except NotFoundError:
            pass
        except StorageError as e:
            if _http_status(e) != 404 and _error_code(e) not in ("403", "Forbidden"):
                raise
    pre = _dir_prefix(key)
    try:
        resp = _retrying("listing of", uri,
                         lambda: _client().list_objects_v2(Bucket=bucket, Prefix=pre, MaxKeys=1))
    except NotFoundError:  # no such bucket
        return False
    return bool(resp.get("KeyCount") or resp.get("Contents"))


def _s3_delete(uri: str) -> int:
    bucket, key = _split(uri)
    if not key:
        raise StorageError(f"refusing to delete the whole bucket {uri}", uri)
    files, _ = _s3_list(uri)
    keys = [_dir_prefix(key) + rel for rel in files]
    if key and _s3_exists_object(bucket, key, uri):
        keys.append(key)
    deleted = len(keys)
    marker = _dir_prefix(key) + MARKER
    if marker in keys:  # un-publish first: a crash mid-delete leaves an incomplete dir, not a corrupt one
        _retrying("delete of", uri, lambda: _client().delete_object(Bucket=bucket, Key=marker))
        keys.remove(marker)
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        resp = _retrying("delete of", uri, lambda: _client().delete_objects(
            Bucket=bucket, Delete={"Objects": batch, "Quiet": True}))
        if resp.get("Errors"):
            err = resp["Errors"][0]
            raise StorageError(f"delete of {uri} failed for {len(resp['Errors'])} objects, e.g. "
                               f"{err.get('Key')}: {err.get('Code')} {err.get('Message')}", uri)
    return deleted


def _s3_exists_object(bucket: str, key: str, uri: str) -> bool:
    try:
        _retrying("lookup of", uri, lambda: _client().head_object(Bucket=bucket, Key=key))
        return True
    except StorageError as e:
        if isinstance(e, NotFoundError) or _http_status(e) == 404:
            return False
        raise


# ------------------------------------------------------------------------------------------ local helpers
def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _local_files(root: Path) -> dict[str, int]:
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def sha256_file(path: Location) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _safe_target(root: Path, rel: str, uri: str) -> Path:
    target = (root / rel).resolve()
    if root.resolve() not in target.parents:
        raise StorageError(f"refusing to write {rel!r} from {uri} outside {root}", uri)
    return target


# ------------------------------------------------------------------------------------------ public API
def upload_file(src: Location, uri: Location) -> None:
    """Copy the local file ``src`` to ``uri`` (multipart above the threshold)."""
    src = Path(src)
    if not src.is_file():
        raise NotFoundError(f"upload to {uri}: no such file {src}", str(uri))
    if is_s3(uri):
        _s3_put_file(src, str(uri))
    else:
        _atomic_copy(src, local_path(uri))


def download_file(uri: Location, dest: Location) -> None:
    """Copy the object / file at ``uri`` to the local path ``dest``."""
    dest = Path(dest)
    if is_s3(uri):
        _s3_get_file(str(uri), dest)
        return
    src = local_path(uri)
    if not src.is_file():
        raise NotFoundError(f"download of {uri}: not found", str(uri))
    _atomic_copy(src, dest)


def list_files(uri: Location) -> dict[str, int]:
    """Every file under the directory / prefix ``uri``: relative POSIX path -> size in bytes."""
    return _s3_list(str(uri))[0] if is_s3(uri) else _local_files(local_path(uri))


def list_dirs(uri: Location) -> list[str]:
    """Names of the immediate sub-directories (S3: common prefixes) of ``uri``, sorted."""
    if is_s3(uri):
        return sorted(_s3_list(str(uri), delimiter=True)[1])
    p = local_path(uri)
    return sorted(d.name for d in p.iterdir() if d.is_dir()) if p.is_dir() else []


def exists(uri: Location) -> bool:
    """An object / file at ``uri``, or anything under it as a directory / prefix."""
    if is_s3(uri):
        return _s3_exists(str(uri))
    return local_path(uri).exists()


def read_bytes(uri: Location) -> bytes:
    if is_s3(uri):
        return _s3_read(str(uri))
    p = local_path(uri)
    if not p.is_file():
        raise NotFoundError(f"read of {uri}: not found", str(uri))
    return p.read_bytes()


def write_bytes(uri: Location, data: bytes) -> None:
    """Write a small object (one PUT; locally atomic via a temporary file)."""
    if is_s3(uri):
        _s3_write(str(uri), data)
    else:
        _atomic_write(local_path(uri), data)


def read_text(uri: Location) -> str:
    return read_bytes(uri).decode()


def write_text(uri: Location, text: str) -> None:
    write_bytes(uri, text.encode())


def read_json(uri: Location) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: Location, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def delete(uri: Location) -> None:
    """Delete the object / file at ``uri`` and everything under it as a prefix / directory (a ``_COMPLETE``
    marker first). Missing locations are not an error."""
    if is_s3(uri):
        n = _s3_delete(str(uri))
        log.debug("deleted %d objects under %s", n, uri)
        return
    p = local_path(uri)
    marker = p / MARKER
    if marker.is_file():
        marker.unlink()
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def upload_dir(src: Location, uri: Location) -> int:
    """Copy every file under the local directory ``src`` to ``uri/<relative path>``; returns the count.
    Plain copy, no manifest or marker (see :func:`publish_dir`)."""
    src = Path(src)
    if not src.is_dir():
        raise NotFoundError(f"upload to {uri}: no such directory {src}", str(uri))
    rels = list(_local_files(src))
    _parallel(lambda rel: upload_file(src / rel, join(uri, rel)), rels)
    log.debug("uploaded %d files from %s to %s", len(rels), src, uri)
    return len(rels)


def download_dir(uri: Location, dest: Location) -> int:
    """Copy every file under ``uri`` into the local directory ``dest``; returns the count (0: nothing there)."""
    dest = Path(dest)
    rels = list(list_files(uri))
    targets = [(rel, _safe_target(dest, rel, str(uri))) for rel in rels]
    _parallel(lambda rt: download_file(join(uri, rt[0]), rt[1]), targets)
    return len(rels)


# ------------------------------------------------------------------------------------------ manifests
def build_manifest(local_dir: Location) -> dict[str, Any]:
    """``{"version": 1, "files": {relative path: {"sha256": ..., "size": ...}}}`` for every file under
    ``local_dir`` except a top-level ``MANIFEST.json`` / ``_COMPLETE``."""
    root = Path(local_dir)
    rels = [rel for rel in _local_files(root) if rel not in _RESERVED]
    hashes = _parallel(lambda rel: sha256_file(root / rel), rels)
    files = {rel: {"sha256": h, "size": (root / rel).stat().st_size} for rel, h in zip(rels, hashes)}
    return {"version": 1, "files": files}


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _marker_bytes(manifest_bytes: bytes, manifest: dict[str, Any]) -> bytes:
    files = manifest["files"]
    return (json.dumps({"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "files": len(files),
                        "bytes": sum(f["size"] for f in files.values())}, sort_keys=True) + "\n").encode()


def publish_dir(src: Location, uri: Location, *, move: bool = False) -> dict[str, Any]:
    """Publish the local directory ``src`` at ``uri`` with ``MANIFEST.json`` and, last, ``_COMPLETE``;
    whatever was at ``uri`` before is replaced. ``move=True`` (local destinations): rename ``src`` into place
    instead of copying it when both are on one filesystem. Returns the manifest."""
    src = Path(src)
    if not src.is_dir():
        raise NotFoundError(f"publish to {uri}: no such directory {src}", str(uri))
    t0 = time.perf_counter()
    manifest = build_manifest(src)
    mbytes = _manifest_bytes(manifest)
    marker = _marker_bytes(mbytes, manifest)
    if is_s3(uri):
        uri = str(uri).rstrip("/")
        delete(uri)  # old marker first, then any stale objects
        rels = list(manifest["files"])
        _parallel(lambda rel: upload_file(src / rel, join(uri, rel)), rels)
        write_bytes(join(uri, MANIFEST), mbytes)
        write_bytes(join(uri, MARKER), marker)  # the commit point
    else:
        _publish_local(src, local_path(uri), mbytes, marker, move)
    size = sum(f["size"] for f in manifest["files"].values())
    log.info("published %d files (%.1f MB) to %s in %.1fs", len(manifest["files"]), size / 1e6, uri,
             time.perf_counter() - t0)
    return manifest


def _publish_local(src: Path, dest: Path, mbytes: bytes, marker: bytes, move: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.resolve() == src.resolve():  # publish in place
        (dest / MARKER).unlink(missing_ok=True)
        _atomic_write(dest / MANIFEST, mbytes)
        _atomic_write(dest / MARKER, marker)
        return
    tmp = None
    if move:
        try:
            staged = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
            os.replace(src, staged)  # fails across filesystems: copy instead
            tmp = staged
        except OSError:
            tmp = None
    if tmp is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    try:
        _atomic_write(tmp / MANIFEST, mbytes)
        _atomic_write(tmp / MARKER, marker)  # written last, and only visible with the rename below
        old = None
        if dest.exists() or dest.is_symlink():
            old = dest.parent / f".old-{dest.name}-{uuid.uuid4().hex[:8]}"
            if dest.is_dir():
                (dest / MARKER).unlink(missing_ok=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_complete(uri: Location) -> bool:
    """Whether ``uri`` carries a ``_COMPLETE`` marker (cheap; :func:`verify` checks the content)."""
    return exists(join(uri, MARKER))


def _load_manifest(uri: Location, marker_listed: bool | None = None) -> tuple[dict[str, Any], bytes]:
    if marker_listed is False:
        raise IncompleteError(f"{uri}: no {MARKER} marker (an interrupted or unfinished publish)", str(uri))
    try:
        marker = json.loads(read_bytes(join(uri, MARKER)))
    except NotFoundError:
        raise IncompleteError(f"{uri}: no {MARKER} marker (an interrupted or unfinished publish)",
                              str(uri)) from None
    except ValueError:
        raise IntegrityError(f"{uri}: unreadable {MARKER} marker", str(uri)) from None
    try:
        mbytes = read_bytes(join(uri, MANIFEST))
    except NotFoundError:
        raise IntegrityError(f"{uri}: {MARKER} marker but no {MANIFEST}", str(uri)) from None
    if not isinstance(marker, dict) or hashlib.sha256(mbytes).hexdigest() != marker.get("manifest_sha256"):
        raise IntegrityError(f"{uri}: {MANIFEST} does not match the sha256 recorded in {MARKER}", str(uri))
    try:
        manifest = json.loads(mbytes)
        files = manifest["files"]
        assert isinstance(files, dict) and all("sha256" in f and "size" in f for f in files.values())
    except (ValueError, KeyError, TypeError, AssertionError):
        raise IntegrityError(f"{uri}: malformed {MANIFEST}", str(uri)) from None
    return manifest, mbytes


def verify(uri: Location, deep: bool = True) -> dict[str, Any]:
    """Check that ``uri`` is a complete published directory: marker present, manifest matching the marker,
    every listed file present with its size and (``deep``) its sha256. Returns the manifest; raises
    :class:`IncompleteError` (no marker) or :class:`IntegrityError` (anything else)."""
    listed = list_files(uri)
    manifest, _ = _load_manifest(uri, marker_listed=MARKER in listed)
    for rel, meta in sorted(manifest["files"].items()):
        if rel not in listed:
            raise IntegrityError(f"{uri}: {rel} is missing", str(uri))
        if listed[rel] != meta["size"]:
            raise IntegrityError(f"{uri}: {rel} has {listed[rel]} bytes, the manifest says {meta['size']}", str(uri))
    if deep:
        rels = sorted(manifest["files"])
        if is_s3(uri):
            hashes = _parallel(lambda rel: _s3_sha256(str(join(uri, rel))), rels)
        else:
            root = local_path(uri)
            hashes = _parallel(lambda rel: sha256_file(root / rel), rels)
        for rel, h in zip(rels, hashes):
            if h != manifest["files"][rel]["sha256"]:
                raise IntegrityError(f"{uri}: sha256 mismatch for {rel} (corrupt or modified after publish)",
                                     str(uri))
    return manifest


def _same_local_copy(dest: Path, manifest: dict[str, Any]) -> bool:
    try:
        return (dest / MARKER).is_file() and json.loads((dest / MANIFEST).read_bytes()) == manifest
    except (OSError, ValueError):
        return False


def download_published(uri: Location, dest: Location) -> dict[str, Any]:
    """Fetch the published directory ``uri`` into the local directory ``dest`` and check every file against
    its manifest before ``dest`` (with manifest and marker) appears; an existing ``dest`` that already holds
    the same verified content is reused. Returns the manifest."""
    dest = Path(dest)
    manifest = verify(uri, deep=False)
    mbytes = _manifest_bytes(manifest)
    if _same_local_copy(dest, manifest):
        try:
            verify(dest, deep=True)
            log.info("using the verified local copy %s of %s", dest, uri)
            return manifest
        except StorageError:
            pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        rels = sorted(manifest["files"])
        _parallel(lambda rel: download_file(join(uri, rel), _safe_target(tmp, rel, str(uri))), rels)
        for rel in rels:
            meta = manifest["files"][rel]
            if (tmp / rel).stat().st_size != meta["size"] or sha256_file(tmp / rel) != meta["sha256"]:
                raise IntegrityError(f"{uri}: sha256 mismatch for {rel} (corrupt or modified after publish)",
                                     str(uri))
        _atomic_write(tmp / MANIFEST, mbytes)
        _atomic_write(tmp / MARKER, _marker_bytes(mbytes, manifest))
        if _same_local_copy(dest, manifest):  # a concurrent download finished first: keep its copy
            return manifest
        old = None
        if dest.exists():
            old = dest.parent / f".old-{dest.name}-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(dest, old)
            except FileNotFoundError:  # a concurrent download moved it
                old = None
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / MARKER).is_file():  # unless a concurrent download won the race
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloaded %d verified files from %s to %s", len(manifest["files"]), uri, dest)
    return manifest


__all__ = [
    "MANIFEST", "MARKER", "IncompleteError", "IntegrityError", "NotFoundError", "S3Settings", "StorageError",
    "build_manifest", "configure", "delete", "download_dir", "download_file", "download_published", "exists",
    "is_complete", "is_s3", "join", "list_dirs", "list_files", "local_path", "publish_dir", "read_bytes",
    "read_json", "read_text", "redact", "settings", "sha256_file", "upload_dir", "upload_file", "verify",
    "write_bytes", "write_json", "write_text",
]
