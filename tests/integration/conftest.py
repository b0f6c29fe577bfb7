"""Fixtures for recipe-level tests on the offline tiny SD3."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowgrpo.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; every in-process run starts from a clean slate."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def tiny_cfg(tiny_model_dir, tmp_path):
    """A tiny_cpu config pointed at the session's tiny model and a fresh output dir."""

    def make(*overrides: str, out: Path | None = None) -> RunConfig:
        return load_config(REPO / "configs" / "tiny_cpu.yaml",
                           [f"model.path={tiny_model_dir}", f"output_dir={out or tmp_path / 'run'}", "eval.every=0",
                            "tracking.enabled=false", *overrides])

    return make
