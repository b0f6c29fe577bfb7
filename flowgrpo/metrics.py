"""The logger seam: the recipe reports through :class:`MetricsLogger`; ``metrics.jsonl`` and image grids
on disk are the always-on sink, MLflow plugs in beside it (tracking issue)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image, ImageDraw


class MetricsLogger(Protocol):
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None: ...

    def log_images(self, key: str, images: np.ndarray, captions: Sequence[str], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """One JSON object per call appended to ``<dir>/metrics.jsonl``; image grids to ``<dir>/samples/``."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs > ``epoch`` (work lost by a crash is logged again after resume)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("epoch", -1) <= epoch]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in metrics.items()}) + "\n")

    def log_images(self, key: str, images: np.ndarray, captions: Sequence[str], step: int) -> None:
        """A captioned grid ``samples/<key>-<step>.png``; videos ([N, F, H, W, 3]) also get one GIF per sample,
        ``samples/<key>-<step>-<i>.gif`` (the grid then shows first frames)."""
        out = self.dir / "samples"
        out.mkdir(exist_ok=True)
        image_grid(images, captions).save(out / f"{key}-{step:05d}.png")
        if np.ndim(images) == 5:
            save_gifs(images, out, f"{key}-{step:05d}")

    def close(self) -> None:
        pass


class MultiLogger:
    def __init__(self, loggers: Sequence[MetricsLogger]):
        self.loggers = list(loggers)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_images(self, key: str, images: np.ndarray, captions: Sequence[str], step: int) -> None:
        for lg in self.loggers:
            lg.log_images(key, images, captions, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def save_gifs(videos: np.ndarray, out_dir: str | Path, stem: str, fps: int = 8) -> list[Path]:
    """uint8 videos [N, F, H, W, 3] -> ``<out_dir>/<stem>-<i>.gif`` (looping, ``fps`` frames per second) for each
    sample; returns the paths."""
    paths = []
    for i, clip in enumerate(np.asarray(videos)):
        frames = [Image.fromarray(f) for f in clip]  # F x [H, W, 3]
        path = Path(out_dir) / f"{stem}-{i:02d}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
        paths.append(path)
    return paths


def image_grid(images: np.ndarray, captions: Sequence[str], cols: int = 4, caption_h: int = 14) -> Image.Image:
    """uint8 [N, H, W, 3] -> one PIL grid with a caption strip under each tile (videos [N, F, H, W, 3]: first
    frames)."""
    if images.ndim == 5:
        images = images[:, 0]
    n, h, w, _ = images.shape
    tile = max(w, 128)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    grid = Image.new("RGB", (cols * tile, rows * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, cols)
        im = Image.fromarray(images[i]).resize((tile, tile), Image.NEAREST)
        grid.paste(im, (c * tile, r * (tile + caption_h)))
        text = captions[i] if i < len(captions) else ""
        draw.text((c * tile + 2, r * (tile + caption_h) + tile + 1), text[: tile // 6], fill="black")
    return grid
