"""Config: every preset loads and validates; invalid values fail before any model is built, naming the
field, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowgrpo.config import ConfigError, RunConfig, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
PAPER_PRESETS = {"geneval_sd3", "ocr_sd3", "pickscore_sd3", "geneval_sd3_fast_nocfg", "ocr_sd3_fast_nocfg",
                 "pickscore_sd3_fast_nocfg", "grpo_guard_ocr_sd3", "tiny_cpu"}


def test_all_paper_presets_exist():
    assert PAPER_PRESETS <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_preset_loads_and_validates(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # the paper presets are written for 32 ranks (guard: 16), tiny_cpu for one or two processes
    world = {"grpo_guard_ocr_sd3": 16, "tiny_cpu": 1}.get(path.stem, 32)
    cfg.check_world_size(world)
    # round trip through YAML gives the same config
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()


def test_paper_numbers():
    g = load_config(CONFIGS[0].parent / "geneval_sd3.yaml")
    assert (g.sample.num_steps, g.sample.group_size, g.sample.noise_level, g.train.beta) == (10, 24, 0.7, 0.04)
    assert g.sample.num_train_steps == 9  # int(10 * 0.99): the last step is never trained
    fast = load_config(CONFIGS[0].parent / "geneval_sd3_fast_nocfg.yaml")
    assert not fast.sample.cfg and fast.sample.sde_type == "cps" and fast.sample.num_train_steps == 3
    guard = load_config(CONFIGS[0].parent / "grpo_guard_ocr_sd3.yaml")
    assert guard.train.guard and guard.reward == {"ocr": 1.0, "pickscore": 0.0}


def test_dotted_overrides():
    cfg = load_config(CONFIGS[0].parent / "tiny_cpu.yaml",
                      ["output_dir=/tmp/x", "train.epochs=3", "sample.sde_window_range=[1, 4]",
                       "sample.sde_window_size=2", "reward.jpeg_incompressibility=0.5", "train.clip_range=1e-3"])
    assert cfg.output_dir == "/tmp/x" and cfg.train.epochs == 3
    assert cfg.sample.sde_window_range == [1, 4] and cfg.sample.num_train_steps == 2
    assert cfg.reward == {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}
    assert cfg.train.clip_range == 1e-3


INVALID = [
    (["sample.group_size=0"], "sample.group_size"),
    (["sample.sde_type=ode"], "sample.sde_type"),
    (["train.clip_range=0"], "train.clip_range"),
    (["train.clip_range=-1e-4"], "train.clip_range"),
    (["sample.sde_window_size=4", "sample.sde_window_range=[0, 3]"], "sample.sde_window_size"),
    (["sample.sde_window_size=2", "sample.sde_window_range=[4, 12]"], "sample.sde_window_range"),
    (["reward.not_a_reward=1.0"], "reward.not_a_reward"),
    (["reward.jpeg_compressibility=0"], "reward"),
    (["reward.jpeg_compressibility=high"], "reward.jpeg_compressibility"),
    (["train.gradient_accumulation_steps=3"], "train.gradient_accumulation_steps"),
    (["model.mixed_precision=fp8"], "model.mixed_precision"),
    (["sample.resolution=100"], "sample.resolution"),
    (["sample.noise_level=0"], "sample.noise_level"),
    (["train.epochs=two"], "train.epochs"),
    (["train.ema=maybe"], "train.ema"),
    (["sample.bach_size=8"], "sample.bach_size"),
    (["train.guard=true", "sample.sde_type=cps"], "train.guard"),
    (["train.deepspeed_stage=4"], "train.deepspeed_stage"),
    (["model.compile=true", "train.deepspeed_stage=2"], "model.compile"),
    (["sample.timestep_fraction=1.5"], "sample.timestep_fraction"),
    (["model.family=sdxl"], "model.family"),
    (["device=tpu"], "device"),
    (["model.num_frames=9"], "model.num_frames"),  # tiny_cpu is an image family
]


@pytest.mark.parametrize("frames,ok", [(9, True), (33, True), (8, False), (-3, False)])
def test_num_frames_is_4k_plus_1_for_video_families(frames, ok):
    preset = CONFIGS[0].parent / "tiny_wan_cpu.yaml"
    if ok:
        assert load_config(preset, [f"model.num_frames={frames}"]).model.num_frames == frames
    else:
        with pytest.raises(ConfigError, match=r"model\.num_frames.*4k \+ 1"):
            load_config(preset, [f"model.num_frames={frames}"])


@pytest.mark.parametrize("overrides,field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_config_names_field_value_and_fix(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS[0].parent / "tiny_cpu.yaml", overrides)
    msg = str(e.value)
    assert e.value.field_name == field, msg
    assert field in msg and ":" in msg.split(field, 1)[1]  # "field=value: what is allowed"


def test_world_size_geometry_error_suggests_batch_sizes():
    cfg = load_config(CONFIGS[0].parent / "geneval_sd3.yaml")
    with pytest.raises(ConfigError) as e:
        cfg.check_world_size(1)  # 9 images on one rank cannot hold a group of 24
    assert "sample.group_size" in str(e.value) and "sample.batch_size in [24" in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config"):
        load_config("configs/does_not_exist.yaml")


def test_cli_fails_before_any_model_is_built(tmp_path):
    """An invalid value exits 2 with the message, quickly and without importing diffusers."""
    code = ("import sys; from flowgrpo.cli import main; rc = main(['train', '--config', 'configs/tiny_cpu.yaml', "
            f"'output_dir={tmp_path}', 'sample.group_size=3']); "
            "print('diffusers' in sys.modules); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 2, p.stderr
    assert "sample.group_size=3" in p.stderr and "must divide" in p.stderr
    assert p.stdout.strip() == "False"  # no model code was even imported
    assert not any(tmp_path.iterdir())  # nothing written
