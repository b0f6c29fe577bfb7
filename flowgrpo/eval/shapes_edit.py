"""A counting-edit task in the shapes world: upstream's ``counting_edit`` in miniature, fully offline.

Each row asks to change the number of one coloured shape in a rendered source image, in upstream's format::

    {"tag": "counting", "prompt": "change the number of red circles in the image to three",
     "t2i_prompt": "a photo of two red circles", "image": "<abs path>/red_circle_2.png", "source_count": 2,
     "include": [{"class": "circle", "count": 3, "color": "red"}], "exclude": [{"class": "circle", "count": 4}]}

so the ``shapes`` reward scores the edit (the include/exclude clauses, GenEval's rule engine) and
``image_similarity`` scores consistency with the source (the same ``image`` key). Targets follow the shapes
world's train/test split of counting scenes (:func:`flowgrpo.eval.shapes.split_of`); sources have 1-4 objects,
never the target count. Source images are rendered once (64 px, deterministic) into
``$FLOWGRPO_CACHE/edit_sources/shapes_edit-v1`` (default ``~/.cache/flowgrpo/edit_sources/...``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from flowgrpo.prompts import PromptSet

from . import shapes

#: bump when the rows or the rendering change (the source folder's name)
SHAPES_EDIT_VERSION = "v1"
SOURCE_SIZE = 64


def _source_row(color: str, shape: str, count: int) -> dict[str, Any]:
    if count == 1:
        return shapes.make_row("single_object", [(color, shape)])
    return shapes.make_row("counting", [(color, shape)], count=count)


def edit_rows(split: str) -> list[dict[str, Any]]:
    """The rows of ``split`` ("train" / "test"), image paths relative (``<color>_<shape>_<n>.png``), fixed order."""
    rows = []
    for target in shapes.split_prompts("counting", split):
        (clause,) = target["include"]
        color, shape, n = clause["color"], clause["class"], int(clause["count"])
        for n0 in (1, *shapes.COUNTING_COUNTS):
            if n0 == n:
                continue
            rows.append({
                "tag": "counting",
                "prompt": f"change the number of {color} {shape}s in the image to {shapes.NUMBER_WORDS[n]}",
                "t2i_prompt": f"a photo of {shapes._np(f'{color} {shape}', n0)}",
                "image": f"{color}_{shape}_{n0}.png",
                "source_count": n0,
                "include": [dict(clause)],
                "exclude": [{"class": shape, "count": n + 1}],
            })
    return rows


def source_dir() -> Path:
    from flowgrpo.storage import cache_root

    return cache_root() / "edit_sources" / f"shapes_edit-{SHAPES_EDIT_VERSION}"


def render_sources(rows: list[dict[str, Any]], out_dir: str | os.PathLike) -> Path:
    """Render each row's source scene (its ``t2i_prompt``) to ``out_dir/<image>`` unless present (atomic)."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        path = out / row["image"]
        if path.is_file():
            continue
        (clause,) = row["include"]
        scene = _source_row(clause["color"], clause["class"], int(row["source_count"]))
        seed = int.from_bytes(hashlib.sha256(f"shapes-edit/{row['image']}".encode()).digest()[:8], "big")
        img = shapes.render(scene, SOURCE_SIZE, seed=seed)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
        Image.fromarray(img).save(tmp)
        os.replace(tmp, path)
    return out


def builtin_edit_set(split: str) -> PromptSet:
    """``builtin:shapes_edit_<split>``: :func:`edit_rows` with absolute image paths (sources rendered on first use)."""
    if split not in shapes.SPLITS:
        raise ValueError(f"unknown shapes_edit split {split!r}; expected one of {shapes.SPLITS}")
    rows = edit_rows(split)
    folder = render_sources(rows, source_dir())
    for row in rows:
        row["image"] = str(folder / row["image"])
    return PromptSet([r["prompt"] for r in rows], rows)


__all__ = ["SHAPES_EDIT_VERSION", "builtin_edit_set", "edit_rows", "render_sources", "source_dir"]
