"""Model locations -> local diffusers directories -> adapters.

``resolve_model_path`` understands:

* ``tiny`` / ``tiny:<spec>``  - an offline tiny SD3 built once into the cache (:func:`tiny.cached_tiny_model`)
* ``tiny-flux`` / ``tiny-flux:<spec>`` - an offline tiny FLUX (:func:`tiny_flux.cached_tiny_flux_model`)
* ``tiny-flux-kontext`` - an offline tiny FLUX.1-Kontext pipeline (spec ``kontext``)
* ``tiny-wan`` / ``tiny-wan:<spec>`` - an offline tiny Wan2.1 text-to-video (:func:`tiny_wan.cached_tiny_wan_model`)
* ``tiny-qwen-image`` / ``tiny-qwen-image:<spec>`` - an offline tiny Qwen-Image
  (:func:`tiny_qwen_image.cached_tiny_qwen_image_model`); ``tiny-qwen-image-edit`` - its Qwen-Image-Edit pipeline
* ``tiny-clip`` - an offline tiny random CLIP for the CLIP-based rewards
  (:func:`flowgrpo.rewards.testing.cached_tiny_clip`)
* ``shapes`` / ``shapes:<preset>`` - the tiny SD3 pretrained on the shapes world, trained once into the cache
  (:func:`pretrain.cached_shapes_model`; presets in :data:`pretrain.PRESETS`, ``shapes`` = ``shapes:default``;
  sample it with ``model.max_sequence_length=16``)
* an existing local directory, or ``file:///abs/dir``
* ``s3://bucket/prefix``       - every object under the prefix, downloaded once into the cache (boto3; endpoint from
  ``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL``); a completion marker makes re-use safe after a crash
* anything else                - a Hugging Face hub repo id (``huggingface_hub.snapshot_download``)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .base import ModelAdapter
from .flux import FluxAdapter
from .flux_kontext import FluxKontextAdapter
from .qwen_image import QwenImageAdapter, QwenImageEditAdapter
from .sd3 import SD3Adapter
from .tiny import cached_tiny_model, default_cache_root
from .wan import WanAdapter

#: family name -> adapter class (each has ``from_pretrained(path, device=, mixed_precision=, ...)``)
ADAPTERS: dict[str, Any] = {"sd3": SD3Adapter, "flux": FluxAdapter, "flux_kontext": FluxKontextAdapter,
                            "wan": WanAdapter,
                            "qwen_image": QwenImageAdapter, "qwen_image_edit": QwenImageEditAdapter}

S3_MARKER = ".flowgrpo_download_complete"


class ModelResolutionError(RuntimeError):
    """A model location could not be turned into a local directory."""


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_root()


def _download_s3(uri: str, root: Path) -> Path:
    """Download every object under ``uri`` (s3://bucket/prefix) to ``root/s3/<bucket>-<hash>`` once."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ModelResolutionError(f"bad S3 URI {uri!r} (expected s3://bucket/prefix)")
    prefix = prefix.strip("/")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{bucket}-{prefix}")[-60:]
    dest = root / "s3" / f"{slug}-{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()[:12]}"
    if (dest / S3_MARKER).is_file():
        return dest
    try:
        import boto3
    except ImportError as e:
        raise ModelResolutionError(f"downloading {uri} needs boto3 (pip install boto3)") from e
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    client = boto3.client("s3", endpoint_url=endpoint) if endpoint else boto3.client("s3")
    key_prefix = f"{prefix}/" if prefix else ""  # "models/a" must not match "models/ab/..."
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        count = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(key_prefix) :]
                if not rel or rel.endswith("/"):
                    continue  # the prefix itself / "directory" marker objects
                target = (tmp / rel).resolve()
                if tmp.resolve() not in target.parents:
                    raise ModelResolutionError(f"refusing S3 key outside the prefix: {obj['Key']!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(target))
                count += 1
        if count == 0:
            raise ModelResolutionError(f"no objects under {uri}")
        (tmp / S3_MARKER).write_text(uri + "\n")
        if dest.exists():  # an incomplete earlier download
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / S3_MARKER).is_file():  # unless a concurrent download won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download_hub(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        msg = f"{repo_id!r} looks like a Hugging Face hub id but huggingface_hub is not installed"
        raise ModelResolutionError(msg) from e
    try:
        kwargs: dict[str, Any] = {"revision": revision}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(Path(cache_dir) / "hf")
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:  # offline, gated, not found, ...
        raise ModelResolutionError(
            f"could not fetch Hugging Face model {repo_id!r} (revision={revision!r}): {type(e).__name__}: {e}. "
            "Without network access, pass a local directory, file://, s3://, 'tiny[:spec]' or 'shapes[:preset]' "
            "instead "
            "(or pre-populate the Hugging Face cache)."
        ) from e


def resolve_model_path(path: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory holding the model named by ``path`` (see the module docstring for the forms).
    ``cache_dir``: root of flowgrpo's caches (default ``$FLOWGRPO_CACHE/models`` or ``~/.cache/flowgrpo/models``);
    hub downloads go to ``cache_dir/hf`` if given, else to the Hugging Face default cache."""
    path = str(path)
    if path == "tiny" or path.startswith("tiny:"):
        return cached_tiny_model(path.partition(":")[2] or "tiny", cache_dir=_cache_root(cache_dir))
    if path == "tiny-flux-kontext":
        from .tiny_flux import cached_tiny_flux_model

        return cached_tiny_flux_model("kontext", cache_dir=_cache_root(cache_dir))
    if path == "tiny-clip":
        from flowgrpo.rewards.testing import cached_tiny_clip

        return cached_tiny_clip(cache_dir=_cache_root(cache_dir))
    if path in ("tiny-qwen-image", "tiny-qwen-image-edit") or path.startswith("tiny-qwen-image:"):
        from .tiny_qwen_image import cached_tiny_qwen_image_model

        spec = "tiny-edit" if path == "tiny-qwen-image-edit" else (path.partition(":")[2] or "tiny")
        return cached_tiny_qwen_image_model(spec, cache_dir=_cache_root(cache_dir))
    if path == "tiny-flux" or path.startswith("tiny-flux:"):
        from .tiny_flux import cached_tiny_flux_model

        return cached_tiny_flux_model(path.partition(":")[2] or "tiny", cache_dir=_cache_root(cache_dir))
    if path == "tiny-wan" or path.startswith("tiny-wan:"):
        from .tiny_wan import cached_tiny_wan_model

        return cached_tiny_wan_model(path.partition(":")[2] or "tiny", cache_dir=_cache_root(cache_dir))
    if path == "shapes" or path.startswith("shapes:"):
        from .pretrain import cached_shapes_model  # lazy: pretraining pulls in the shapes world

        return cached_shapes_model(path.partition(":")[2] or "default", cache_dir=_cache_root(cache_dir),
                                   log=lambda m: print(f"[pretrain-shapes] {m}", file=sys.stderr, flush=True))
    if path.startswith("s3://"):
        return _download_s3(path, _cache_root(cache_dir))
    if path.startswith("file://"):
        local = Path(unquote(urlparse(path).path))
        if not local.is_dir():
            raise FileNotFoundError(f"{path}: no such directory")
        return local.resolve()
    local = Path(path).expanduser()
    if local.is_dir():
        return local.resolve()
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:  # a path, not a hub id ("org/name")
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    return _download_hub(path, revision, cache_dir)


def load_adapter(
    family: str,
    path: str,
    revision: str | None = None,
    device: str = "cpu",
    mixed_precision: str = "no",
    max_sequence_length: int = 128,
    full_finetune: bool = False,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> ModelAdapter:
    """Resolve ``path`` and build the ``family`` adapter on ``device``. Extra ``kwargs`` go to the adapter's
    ``from_pretrained`` (e.g. ``needs_reference=False`` for SD3)."""
    try:
        cls = ADAPTERS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known families: {sorted(ADAPTERS)}") from None
    local = resolve_model_path(path, revision=revision, cache_dir=cache_dir)
    return cls.from_pretrained(
        local,
        device=device,
        mixed_precision=mixed_precision,
        max_sequence_length=max_sequence_length,
        full_finetune=full_finetune,
        **kwargs,
    )


__all__ = ["ADAPTERS", "ModelResolutionError", "load_adapter", "resolve_model_path"]
