"""Training checkpoints on any storage location: ``<root>/step-<N>/``.

``root`` is ``storage.checkpoint_uri`` (``s3://bucket/prefix`` or a local path / ``file://``) or, by default,
``<output_dir>/checkpoints``. Every rank writes its files into a local staging directory; rank 0 then
publishes it with :func:`flowgrpo.storage.publish_dir`: ``MANIFEST.json`` (sha256 + size of every file) and,
last, the ``_COMPLETE`` marker. Locally the staging directory (``<root>/.tmp-step-N``) is renamed into place
with the marker already inside, so a checkpoint appears complete or not at all; on S3 the objects are uploaded
under ``step-N/`` (staged in ``<output_dir>/.checkpoint-staging``) and the marker is the commit point.

Resuming (``--resume auto``) takes the newest checkpoint that verifies: without a marker it is an interrupted
save or upload, with a manifest mismatch it is corrupt; both are skipped with a warning. S3 checkpoints are
downloaded to ``<output_dir>/.checkpoint-cache/step-N`` and hash-checked before anything reads them.

Layout of ``step-N/``:
  trainable.safetensors   trainable weights (LoRA or full), fp32
  ema.safetensors         EMA shadow weights (if EMA is on)
  optimizer.pt            optimizer state (DDP / single process; identical on every rank)
  deepspeed/              DeepSpeed engine checkpoint (sharded optimizer states), instead of optimizer.pt
  rng-rank<R>.pt          RNG states of every rank
  config.yaml             the run config
  state.json              {"epoch": last completed epoch, "global_step": ..., "format": 1}
  MANIFEST.json           relative path -> {"sha256", "size"}
  _COMPLETE               written last: {"manifest_sha256", "files", "bytes"}
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch

from flowgrpo import storage
from flowgrpo.storage import IncompleteError, IntegrityError, Location

_STEP_RE = re.compile(r"^step-(\d+)$")
STATE = "state.json"

Checkpoint = Union[str, Path]  # an s3:// URI or a local directory


class _Entry(NamedTuple):
    step: int
    location: Checkpoint
    marked: bool  # has a _COMPLETE marker (not yet verified)


# ------------------------------------------------------------------------------------------ locations
def checkpoint_root(output_dir: str | Path, uri: str = "") -> Checkpoint:
    """``uri`` (``storage.checkpoint_uri``) if set, else ``<output_dir>/checkpoints``; local roots as a Path."""
    if not uri:
        return Path(output_dir) / "checkpoints"
    return uri.rstrip("/") if storage.is_s3(uri) else storage.local_path(uri)


def step_location(root: Location, step: int) -> Checkpoint:
    return storage.join(root, f"step-{step}")


def tmp_dir_for(root: Path, step: int) -> Path:
    return Path(root) / f".tmp-step-{step}"


def staging_dir(output_dir: str | Path, root: Location, step: int) -> Path:
    """Where the ranks write checkpoint ``step`` before rank 0 publishes it: next to a local root (so that
    publishing is a rename), under ``<output_dir>/.checkpoint-staging`` for S3."""
    if storage.is_s3(root):
        return Path(output_dir) / ".checkpoint-staging" / f"step-{step}"
    return tmp_dir_for(storage.local_path(root), step)


def cache_dir(output_dir: str | Path) -> Path:
    """Local copies of remote checkpoints, downloaded for resuming."""
    return Path(output_dir) / ".checkpoint-cache"


# ------------------------------------------------------------------------------------------ writing
def publish(tmp: Path, root: Location, step: int, state: dict[str, Any], keep: int) -> Checkpoint:
    """Write state.json into the staging dir ``tmp``, publish it as ``<root>/step-N`` (manifest, marker
    last), remove the staging dir and prune to the ``keep`` newest complete checkpoints."""
    (tmp / STATE).write_text(json.dumps({**state, "format": 1}))
    dest = step_location(root, step)
    storage.publish_dir(tmp, dest, move=not storage.is_s3(root))
    shutil.rmtree(tmp, ignore_errors=True)
    if storage.is_s3(root):
        try:
            tmp.parent.rmdir()  # <output_dir>/.checkpoint-staging, when empty
        except OSError:
            pass
    prune(root, keep)
    return dest


def prune(root: Location, keep: int) -> None:
    """Delete complete checkpoints beyond the ``keep`` newest, and unmarked (interrupted) ones older than the
    newest complete one."""
    entries = _scan(root)
    complete = [e for e in entries if e.marked]
    doomed = complete[:-keep] if keep > 0 else []
    if complete:
        doomed += [e for e in entries if not e.marked and e.step < complete[-1].step]
    for e in doomed:
        try:
            storage.delete(e.location)
        except (storage.StorageError, OSError) as err:  # pruning is best effort
            warnings.warn(f"could not delete old checkpoint {e.location}: {err}")


# ------------------------------------------------------------------------------------------ discovery
def _scan(root: Location) -> list[_Entry]:
    """Every ``step-N`` under ``root``, oldest first (one listing for S3)."""
    found: list[_Entry] = []
    if storage.is_s3(root):
        steps: dict[int, bool] = {}
        for rel in storage.list_files(root):
            head, _, tail = rel.partition("/")
            m = _STEP_RE.match(head)
            if m and tail:
                n = int(m.group(1))
                steps[n] = steps.get(n, False) or tail == storage.MARKER
        found = [_Entry(n, step_location(root, n), marked) for n, marked in steps.items()]
    else:
        r = storage.local_path(root)
        if not r.is_dir():
            return []
        for d in r.iterdir():
            m = _STEP_RE.match(d.name)
            if m and d.is_dir():
                found.append(_Entry(int(m.group(1)), d, (d / storage.MARKER).is_file()))
    return sorted(found, key=lambda e: e.step)


def _check(ckpt: Checkpoint, deep: bool) -> dict[str, Any]:
    manifest = storage.verify(ckpt, deep=deep)
    if STATE not in manifest["files"]:
        raise IntegrityError(f"{ckpt}: no {STATE} in the manifest", str(ckpt))
    return manifest


def _skip(ckpt: Checkpoint, err: Exception) -> None:
    if isinstance(err, IncompleteError):
        warnings.warn(f"skipping incomplete checkpoint {ckpt} (no {storage.MARKER} marker: an interrupted save "
                      "or upload)", stacklevel=3)
    else:
        warnings.warn(f"skipping corrupt checkpoint {ckpt}: {err}", stacklevel=3)


def _valid(entry: _Entry, deep: bool) -> bool:
    if not entry.marked:
        _skip(entry.location, IncompleteError(str(entry.location)))
        return False
    try:
        _check(entry.location, deep)
        return True
    except IntegrityError as e:
        _skip(entry.location, e)
        return False


def list_checkpoints(root: Location, deep: bool = False) -> list[Checkpoint]:
    """Complete checkpoints (marker + manifest; ``deep``: hashes too), oldest first; others are skipped
    with a warning."""
    return [e.location for e in _scan(root) if _valid(e, deep)]


def latest_checkpoint(root: Location, deep: bool = False) -> Checkpoint | None:
    """The newest complete checkpoint under ``root`` (Path for local roots, URI for S3), or None."""
    for e in reversed(_scan(root)):
        if _valid(e, deep):
            return e.location
    return None


def fetch(ckpt: Location, cache: Path) -> Path:
    """A local, verified directory holding the checkpoint ``ckpt``: S3 ones are downloaded into ``cache``
    (hash-checked); local ones are checked in place. Raises :class:`flowgrpo.storage.IntegrityError` (or
    :class:`~flowgrpo.storage.IncompleteError`) when it does not verify."""
    if storage.is_s3(ckpt):
        name = str(ckpt).rstrip("/").rsplit("/", 1)[-1]
        local = cache / name
        manifest = storage.download_published(ckpt, local)
        if STATE not in manifest["files"]:
            raise IntegrityError(f"{ckpt}: no {STATE} in the manifest", str(ckpt))
        for other in cache.iterdir():  # keep one cached checkpoint (not other processes' downloads in flight)
            if other.name != name and _STEP_RE.match(other.name):
                shutil.rmtree(other, ignore_errors=True)
        return local
    local = storage.local_path(ckpt)
    if not (local / STATE).is_file():
        raise FileNotFoundError(f"--resume {ckpt}: not a complete checkpoint (no {STATE})")
    if (local / storage.MARKER).is_file() or (local / storage.MANIFEST).is_file():
        _check(local, deep=True)
    else:
        warnings.warn(f"checkpoint {ckpt} has no {storage.MARKER} marker / {storage.MANIFEST} (written by an older "
                      "version?); using it unverified", stacklevel=2)
    return local


def fetch_latest(root: Location, cache: Path) -> tuple[Checkpoint, Path] | None:
    """(location, local verified directory) of the newest checkpoint under ``root`` that verifies fully
    (sha256 of every file), downloading S3 ones into ``cache``; broken ones are skipped with a warning."""
    for e in reversed(_scan(root)):
        if not _valid(e, deep=False):
            continue
        try:
            return e.location, fetch(e.location, cache)
        except IntegrityError as err:
            _skip(e.location, err)
    return None


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE).read_text())


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
