"""Atomic training checkpoints: ``<output_dir>/checkpoints/step-<N>/``.

A checkpoint is written under a temporary name and published with one ``os.replace`` once every part is
on disk; ``state.json`` is written last, so a directory without it is incomplete and never resumed.

Layout of ``step-N/``:
  trainable.safetensors   trainable weights (LoRA or full), fp32
  ema.safetensors         EMA shadow weights (if EMA is on)
  optimizer.pt            optimizer state (DDP / single process; identical on every rank)
  deepspeed/              DeepSpeed engine checkpoint (sharded optimizer states), instead of optimizer.pt
  rng-rank<R>.pt          RNG states of every rank
  config.yaml             the run config
  state.json              {"epoch": last completed epoch, "global_step": ..., "format": 1}
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".tmp-step-{step}"


def publish(tmp: Path, root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write state.json last, then atomically rename ``tmp`` to ``step-N``; prune old checkpoints."""
    (tmp / "state.json").write_text(json.dumps({**state, "format": 1}))
    final = root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if not (m and d.is_dir()):
            continue
        if not (d / "state.json").is_file():
            warnings.warn(f"skipping incomplete checkpoint {d} (no state.json)")
            continue
        found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    cks = list_checkpoints(root)
    return cks[-1] if cks else None


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())


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
