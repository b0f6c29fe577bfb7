"""The evaluation cache: a finished suite evaluation of a model that does not change (the base model, the
champion) is published once and reused by every later run with the same settings.

Key: sha256 of {model identity, suite fingerprint, sampling settings, cache version}. Model identity
(:func:`model_identity`):

* a published directory (``storage.publish_dir``: ``MANIFEST.json`` + ``_COMPLETE``, what ``fetch_model`` and
  training publish), local or ``s3://``: its URI and the sha256 of its manifest - a re-published model with other
  weights gets another key;
* ``tiny[:spec]``: the spec and the tiny-model code version (built deterministically);
* another local directory: a digest of its files' relative paths, sizes and modification times;
* a hub id: the id and its revision; without a pinned revision the model is *not cacheable* (the hub may move
  the branch), and :func:`cache_key` returns None.

Location: ``<cache root>/<suite>-<key[:24]>/`` (the evaluation directory of :mod:`.results`, published with
``storage.publish_dir``). Root: the ``cache_dir`` argument, else ``$FLOWGRPO_EVAL_CACHE``, else
``$FLOWGRPO_HOME/eval-cache`` (``~/.local/share/flowgrpo/eval-cache``); any storage URI works (``s3://...``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from flowgrpo import storage

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_ENV = "FLOWGRPO_EVAL_CACHE"


def default_cache_root() -> str:
    env = os.environ.get(CACHE_ENV)
    if env:
        return env
    from flowgrpo.tracking import state_dir

    return str(state_dir() / "eval-cache")


def _local_dir_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def model_identity(uri: str, revision: str | None = None) -> dict[str, Any]:
    """What identifies the weights at ``uri`` (module docstring). ``cacheable`` is False for unpinned hub ids."""
    uri = str(uri)
    if uri == "tiny" or uri.startswith("tiny:"):
        from flowgrpo.models.tiny import TINY_CODE_VERSION

        return {"uri": uri, "tiny_code_version": TINY_CODE_VERSION, "cacheable": True}
    is_local = not storage.is_s3(uri)
    local = storage.local_path(uri) if is_local else None
    if storage.is_s3(uri) or (local is not None and local.is_dir()):
        manifest = storage.join(uri, storage.MANIFEST)
        if storage.is_complete(uri) and storage.exists(manifest):
            digest = hashlib.sha256(storage.read_bytes(manifest)).hexdigest()
            return {"uri": uri.rstrip("/"), "manifest_sha256": digest, "cacheable": True}
        if local is not None:
            return {"uri": str(local.resolve()), "files_sha256": _local_dir_digest(local), "cacheable": True}
        return {"uri": uri, "cacheable": False, "why": "an s3:// prefix without a complete published manifest"}
    # a hub id
    if revision:
        return {"uri": uri, "revision": str(revision), "cacheable": True}
    return {"uri": uri, "cacheable": False, "why": "a hub id without a pinned revision"}


def cache_key(identity: dict[str, Any], suite_fingerprint: dict[str, Any],
              settings_fingerprint: dict[str, Any]) -> str | None:
    """sha256 hex of everything the cached numbers depend on; None when the model is not cacheable."""
    if not identity.get("cacheable"):
        return None
    blob = json.dumps({"v": CACHE_VERSION, "model": identity, "suite": suite_fingerprint,
                       "settings": settings_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_uri(root: str, suite: str, key: str) -> str:
    return str(storage.join(root, f"{suite}-{key[:24]}"))


def lookup(root: str, suite: str, key: str) -> str | None:
    """The URI of a complete cached evaluation, or None."""
    uri = cache_uri(root, suite, key)
    try:
        return uri if storage.is_complete(uri) else None
    except storage.StorageError as e:  # an unreachable cache is a miss, not a failure
        log.warning("eval cache %s unreadable (%s): evaluating instead", uri, e)
        return None


def materialize(uri: str, local_dir: str | os.PathLike) -> Path:
    """A local directory with the cached evaluation at ``uri``: the directory itself when local, else a
    verified download into ``local_dir``."""
    if not storage.is_s3(uri):
        return storage.local_path(uri)
    storage.download_published(uri, local_dir)
    return Path(local_dir)


def publish(local_dir: str | os.PathLike, root: str, suite: str, key: str) -> str | None:
    """Publish a finished evaluation directory into the cache; failures are logged, not raised (the
    evaluation itself succeeded). Returns the URI or None."""
    uri = cache_uri(root, suite, key)
    try:
        storage.publish_dir(local_dir, uri)
        return uri
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation
        log.warning("could not publish the evaluation of %s to the cache %s: %s", suite, uri, e)
        return None


__all__ = ["CACHE_ENV", "CACHE_VERSION", "cache_key", "cache_uri", "default_cache_root", "lookup", "materialize",
           "model_identity", "publish"]
