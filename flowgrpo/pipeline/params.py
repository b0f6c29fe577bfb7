"""Pipeline arguments: parsing and validation that runs at compile / submit time, before any task starts.

Every check raises :class:`flowgrpo.config.ConfigError` naming the pipeline parameter, the value and the
fix, so a typo in the KFP UI or on the command line never surfaces hours later inside a pod.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from flowgrpo.backends.base import BACKENDS
from flowgrpo.config import ConfigError, RunConfig, load_config

_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
SECRET_PARAMS = ("hf_token_secret", "storage_secret")


def repo_root() -> Path:
    """The checkout (or image directory) holding ``configs/``, ``components/`` and ``pipelines/``."""
    env = os.environ.get("FLOWGRPO_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2]


def ensure_importable() -> None:
    """Put the repo root on sys.path so ``components`` and ``pipelines`` import from the CLI too."""
    import sys

    root = str(repo_root())
    if root not in sys.path:
        sys.path.insert(0, root)


def presets_dir() -> Path:
    return repo_root() / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def resolve_preset(preset: str) -> Path:
    """A preset name (``tiny_cpu``), a YAML path, or an ``s3://`` URI -> the file to load."""
    if preset.startswith("s3://"):
        return Path(preset)  # load_config reads storage URIs itself
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    named = presets_dir() / f"{preset}.yaml"
    if named.is_file():
        return named
    raise ConfigError("preset", preset, f"one of {preset_names()} or a path to a YAML preset")


def parse_reward_weights(text: str) -> dict[str, float]:
    """``"geneval=1.0,ocr=0.5"`` or a JSON object -> {name: weight}; empty -> {} (keep the preset's)."""
    from flowgrpo.rewards import KNOWN_REWARDS

    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError("reward_weights", text, f"a JSON object {{name: weight}} ({e})") from None
        items = list(raw.items())
    else:
        items = []
        for part in re.split(r"[,\s]+", text):
            if not part:
                continue
            name, sep, w = part.partition("=")
            if not sep:
                raise ConfigError("reward_weights", text, f"name=weight pairs separated by commas; {part!r} has no '='")
            items.append((name.strip(), w.strip()))
    out: dict[str, float] = {}
    for name, w in items:
        if name not in KNOWN_REWARDS:
            raise ConfigError("reward_weights", text, f"reward names from {sorted(KNOWN_REWARDS)}; got {name!r}")
        try:
            out[name] = float(w)
        except (TypeError, ValueError):
            raise ConfigError("reward_weights", text, f"a number as the weight of {name!r}; got {w!r}") from None
    if not any(out.values()):
        raise ConfigError("reward_weights", text, "at least one non-zero weight")
    return out


def parse_overrides(text: str) -> list[str]:
    """Extra dotted ``key=value`` config overrides, whitespace separated (shell quoting allowed)."""
    items = shlex.split(text or "")
    bad = [i for i in items if "=" not in i or i.startswith("=")]
    if bad:
        raise ConfigError("overrides", text, f"dotted key=value pairs (e.g. train.learning_rate=1e-5); got {bad[0]!r}")
    return items


def procs_per_node(procs: int, gpus_per_node: int) -> int:
    """Processes per node: ``procs`` if set, else one per GPU, else one."""
    if procs < 0:
        raise ConfigError("procs_per_node", procs, "an int >= 0 (0 = one per GPU, or 1 without GPUs)")
    return procs or max(1, gpus_per_node)


def build_run_config(preset: str, reward_weights: str = "", epochs: int = 0, overrides: str = "",
                     world_size: int | None = 1) -> RunConfig:
    """The run's config: preset, then the UI's reward weights and epochs, then free-form overrides.
    ``world_size`` None skips the batch-geometry checks (steps that do not train)."""
    items = []
    if epochs < 0:
        raise ConfigError("epochs", epochs, "an int >= 0 (0 = the preset's)")
    if epochs:
        items.append(f"train.epochs={epochs}")
    items += parse_overrides(overrides)
    cfg = load_config(resolve_preset(preset), items)
    weights = parse_reward_weights(reward_weights)
    if weights:
        tree = cfg.to_dict()
        tree["reward"] = weights
        tree["reward_options"] = {k: v for k, v in tree["reward_options"].items() if k in weights}
        from flowgrpo.config import _build

        cfg = _build(RunConfig, tree)
    if world_size is not None:
        cfg.check_world_size(world_size)
    return cfg


def parse_gate(text: str):
    """The champion promotion rule (YAML or JSON of :class:`flowgrpo.registry.Gate`); empty -> None."""
    from flowgrpo.registry import Gate, GateError

    if not (text or "").strip():
        return None
    try:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise GateError("a mapping with at least 'metric'")
        return Gate.from_dict(data)
    except (yaml.YAMLError, GateError, TypeError, ValueError) as e:
        raise ConfigError("promotion_rule", text, f"YAML/JSON of a gate {{metric, min_improvement, "
                          f"higher_is_better, guards}} ({e})") from None


def parse_suites(text: str) -> list[str]:
    from flowgrpo.eval import SUITES

    suites = [s for s in re.split(r"[,\s]+", text or "") if s]
    if not suites:
        raise ConfigError("eval_suites", text, f"a comma-separated list from {list(SUITES)}")
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ConfigError("eval_suites", text, f"suites from {list(SUITES)}; unknown {unknown}")
    return suites


def validate_arguments(args: dict[str, Any]) -> dict[str, Any]:
    """Check the arguments of a training run (the ``flow_grpo`` pipeline's parameters) as a whole; returns
    them unchanged. Missing keys take the pipeline's defaults, so partial argument sets are fine."""
    ensure_importable()
    from pipelines.flow_grpo import DEFAULTS  # the pipeline's own defaults: one source of truth

    a = {**DEFAULTS, **args}
    unknown = sorted(set(args) - set(DEFAULTS))
    if unknown:
        raise ConfigError(unknown[0], args[unknown[0]], f"a parameter of the pipeline: {sorted(DEFAULTS)}")
    if a["backend"] not in BACKENDS:
        raise ConfigError("backend", a["backend"], f"one of {BACKENDS}")
    if int(a["nodes"]) < 1:
        raise ConfigError("nodes", a["nodes"], "an int >= 1 (1 = master only)")
    if int(a["gpus_per_node"]) < 0:
        raise ConfigError("gpus_per_node", a["gpus_per_node"], "an int >= 0")
    if a["backend"] == "local" and int(a["nodes"]) != 1:
        raise ConfigError("nodes", a["nodes"], "1 with backend=local (multi-node needs backend=kubernetes)")
    world = int(a["nodes"]) * procs_per_node(int(a["procs_per_node"]), int(a["gpus_per_node"]))
    build_run_config(a["preset"], a["reward_weights"], int(a["epochs"]), a["overrides"], world)
    parse_suites(a["eval_suites"])
    parse_gate(a["promotion_rule"])
    if not str(a["model_name"]).strip():
        raise ConfigError("model_name", a["model_name"], "a registered model name, e.g. flowgrpo-sd3")
    if not str(a["storage_root"]).strip():
        raise ConfigError("storage_root", a["storage_root"], "an s3:// URI (kubernetes) or a directory (local)")
    if a["backend"] == "kubernetes":
        if not str(a["storage_root"]).startswith("s3://"):
            raise ConfigError("storage_root", a["storage_root"], "an s3:// URI with backend=kubernetes (pods share no disk)")
        for key in SECRET_PARAMS:
            name = str(a[key])
            if not name or not _SECRET_NAME.match(name) or len(name) > 253:
                raise ConfigError(key, name, "the name of an existing Kubernetes Secret (DNS-1123: lowercase, "
                                  "digits, '-', '.'); create it first, see manifests/")
        for key in ("trainer_image", "reward_image"):
            if not str(a[key]).strip():
                raise ConfigError(key, a[key], "a container image reference (registry/name:tag or @sha256:...)")
    if not isinstance(a["tolerations"], list):
        raise ConfigError("tolerations", a["tolerations"], "a JSON list of Kubernetes tolerations")
    if not isinstance(a["node_selector"], dict):
        raise ConfigError("node_selector", a["node_selector"], "a JSON object {label: value}")
    return args
