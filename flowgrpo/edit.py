"""Editing tasks: prompt rows that carry a source image.

An edit prompt set is a ``.jsonl`` file (or a built-in set) whose rows have, beside the edit instruction ``prompt``,
the source image under ``"image"``: upstream's ``counting_edit`` format,
``{"prompt": "Change the number of ...", "t2i_prompt": "a photo of ...", "image": "generated_images/image_9.jpg",
"include": [...], "exclude": [...]}``. Relative paths are resolved against ``data.image_root`` (default: the prompt
file's folder) when the prompts are loaded (:func:`resolve_sources`), so the rewards (``image_similarity`` reads the
same key) and the model see the same file. Prompt files and sources may live on a storage URI (``s3://...``, e.g.
for a PyTorchJob whose pods share no disk): the sources are fetched once into a local cache; a reward server in
another pod receives each source inline with the request (:class:`~flowgrpo.rewards.remote.RemoteReward`).

The model side: an edit adapter has ``edit = True`` and its ``encode_prompts(prompts, images)`` takes the source
images as fp32 ``[B, 3, R, R]`` in [0, 1] at the sample resolution (:class:`SourceImages` loads and caches them).
The rollout's :class:`~flowgrpo.rollout.PromptEncoder` keys its cache on (prompt, source), so each unique pair is
encoded once per epoch.

Source images that do not exist yet (upstream ships ``counting_edit`` without its ``generated_images``) are made
from each row's ``t2i_prompt`` with any text-to-image model: :func:`generate_sources`
(``flowgrpo make-edit-sources``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flowgrpo.prompts import PromptSet

#: metadata key of the source image (upstream's counting_edit format; also ``image_similarity``'s default ``ref_key``)
SOURCE_KEY = "image"
#: metadata key of the text-to-image prompt a missing source is generated from
T2I_KEY = "t2i_prompt"


def is_edit(adapter: Any) -> bool:
    """Whether ``adapter`` (or adapter class) conditions on a source image."""
    return bool(getattr(adapter, "edit", False))


def source_of(metadata: Mapping[str, Any], where: str = "metadata") -> str:
    """The source image path of one row; a clear error when the row has none."""
    src = metadata.get(SOURCE_KEY) if isinstance(metadata, Mapping) else None
    if not isinstance(src, (str, os.PathLike)) or not str(src):
        raise ValueError(f"{where} has no source image under {SOURCE_KEY!r} (an edit model needs one per prompt row: "
                         f"a path, relative to data.image_root or the prompt file's folder); got {metadata!r:.200}")
    return str(src)


def resolve_sources(prompts: PromptSet, root: str | os.PathLike, spec: str = "prompts",
                    require: bool = False) -> PromptSet:
    """Make every row's ``image`` a local, absolute, checked path: relative ones are taken from ``root``; sources
    on a storage URI (an ``s3://`` ``root``, or an ``s3://`` value) are fetched once into the local cache
    (:func:`fetch_remote_sources`). ``require``: every row must have a source (edit models). Rows are modified in
    place; returns ``prompts``. Missing files fail here, before any model is built, naming the first few and the fix."""
    from flowgrpo import storage

    remote_root = storage.is_s3(str(root))
    base = None if remote_root else Path(root).expanduser()
    missing: list[str] = []
    remote: dict[str, list[dict]] = {}  # URI -> the rows that use it
    for i, md in enumerate(prompts.metadata):
        if SOURCE_KEY not in md:
            if require:
                source_of(md, f"{spec}: row {i + 1}")
            continue
        src = source_of(md, f"{spec}: row {i + 1}")
        if storage.is_s3(src) or (remote_root and not Path(src).is_absolute()):
            remote.setdefault(src if storage.is_s3(src) else str(storage.join(str(root), src)), []).append(md)
            continue
        path = Path(src).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        md[SOURCE_KEY] = str(path.resolve())
        if not path.is_file():
            missing.append(str(path))
    if remote:
        local, gone = fetch_remote_sources(list(remote))
        missing += gone
        for uri, rows in remote.items():
            for md in rows:
                md[SOURCE_KEY] = str(local.get(uri, uri))
    if missing:
        raise FileNotFoundError(
            f"{spec}: {len(missing)} source image(s) do not exist, e.g. {missing[:3]}. Set data.image_root to the "
            "folder (or s3:// prefix) that holds them, or generate them from the rows' t2i_prompt with "
            f"`flowgrpo make-edit-sources {spec} <image_root> --model <text-to-image model>`.")
    return prompts


def remote_cache_dir() -> Path:
    """Where sources on storage URIs are kept: ``$FLOWGRPO_CACHE/edit_sources/remote`` (``~/.cache/flowgrpo`` by
    default), mirroring ``bucket/key``."""
    from flowgrpo.storage import cache_root

    return cache_root() / "edit_sources" / "remote"


def fetch_remote_sources(uris: Sequence[str], workers: int = 8) -> tuple[dict[str, Path], list[str]]:
    """Download the objects ``uris`` (``s3://bucket/key``) into :func:`remote_cache_dir` (``<dir>/bucket/key``),
    ``workers`` at a time; files already there are reused (source images are treated as immutable: a changed
    object needs a new key or a cleared cache). Returns ({uri: local path}, [uris that do not exist])."""
    from concurrent.futures import ThreadPoolExecutor

    from flowgrpo import storage

    cache = remote_cache_dir()

    def fetch(uri: str) -> tuple[str, Path | None]:
        rel = uri[len("s3://"):].strip("/")
        dest = cache / rel
        if ".." in Path(rel).parts:
            raise ValueError(f"source image URI {uri!r} must not contain '..'")
        if not dest.is_file():
            try:
                storage.download_file(uri, dest)
            except FileNotFoundError:
                return uri, None
        return uri, dest

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(fetch, dict.fromkeys(uris)))
    return {u: p for u, p in results if p is not None}, [u for u, p in results if p is None]


def load_source_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """fp32 [3, R, R] in [0, 1]: the image at ``path``, RGB, centre-cropped to a square and resized (bicubic)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != resolution:
            im = im.resize((resolution, resolution), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0  # [R, R, 3]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class SourceImages:
    """Loads source images at ``resolution`` and keeps each decoded file (``cache_size`` most recent)."""

    def __init__(self, resolution: int, cache_size: int = 1024):
        self.resolution = int(resolution)
        self.cache_size = int(cache_size)
        self._cache: dict[str, np.ndarray] = {}

    def load(self, path: str) -> np.ndarray:
        arr = self._cache.pop(path, None)
        if arr is None:
            arr = load_source_image(path, self.resolution)
        self._cache[path] = arr  # most recent last
        while len(self._cache) > self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        return arr

    def __call__(self, metadata: Sequence[Mapping[str, Any]]):
        """fp32 tensor [B, 3, R, R] in [0, 1], one row per metadata row."""
        import torch

        return torch.from_numpy(np.stack([self.load(source_of(md, f"metadata[{i}]"))
                                          for i, md in enumerate(metadata)]))


def generate_sources(
    prompts: PromptSet,
    image_root: str | os.PathLike,
    sample: Callable[[list[str], list[int]], np.ndarray],
    *,
    seed: int = 0,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write the missing source images of ``prompts`` under ``image_root``.

    Each unique relative ``image`` path is generated once from its row's ``t2i_prompt`` by
    ``sample(t2i_prompts, seeds) -> uint8 [B, H, W, 3]`` (e.g. a deterministic ODE sampler of a text-to-image model),
    seed = ``seed`` + the path's first-occurrence index. Existing files are kept unless ``overwrite``. Returns the
    paths written. Rows whose source has no ``t2i_prompt`` and does not exist raise ValueError before sampling."""
    from PIL import Image

    root = Path(image_root)
    todo: dict[str, tuple[str, int]] = {}
    for i, md in enumerate(prompts.metadata):
        rel = source_of(md, f"row {i + 1}")
        target = Path(rel) if Path(rel).is_absolute() else root / rel
        if str(target) in todo or (target.is_file() and not overwrite):
            continue
        t2i = md.get(T2I_KEY)
        if not isinstance(t2i, str) or not t2i:
            raise ValueError(f"row {i + 1}: source {rel!r} does not exist and the row has no {T2I_KEY!r} to "
                             "generate it from")
        todo[str(target)] = (t2i, seed + len(todo))
    items = list(todo.items())
    written: list[Path] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = sample([t2i for _, (t2i, _) in chunk], [s for _, (_, s) in chunk])
        for (target, _), img in zip(chunk, images):
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
            Image.fromarray(np.asarray(img, dtype=np.uint8)).save(tmp)
            os.replace(tmp, path)
            written.append(path)
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    return written


def load_prompt_set(spec: str, image_root: str = "", edit: bool = False) -> PromptSet:
    """:func:`flowgrpo.prompts.load_prompts` plus source images: rows with an ``image`` get absolute, checked paths
    (relative to ``image_root``, default the prompt file's folder); ``edit``: every row must have one."""
    from flowgrpo.prompts import load_prompts

    ps = load_prompts(spec)
    if edit or any(SOURCE_KEY in md for md in ps.metadata):
        resolve_sources(ps, image_root or _folder_of(spec), spec, require=edit)
    return ps


def _folder_of(spec: str) -> str:
    """The folder (or ``s3://`` prefix) of a prompt file; "." for built-in sets."""
    if spec.startswith("builtin:"):
        return "."
    if spec.startswith("s3://"):
        return spec.rsplit("/", 1)[0]
    return str(Path(spec).parent)


__all__ = ["SOURCE_KEY", "SourceImages", "T2I_KEY", "fetch_remote_sources", "generate_sources", "is_edit",
           "load_prompt_set", "load_source_image", "remote_cache_dir", "resolve_sources", "source_of"]
