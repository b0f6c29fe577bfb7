"""Typed run configuration: dataclasses + YAML presets + ``key=value`` dotted overrides.

Every invariant that can be checked without building a model is checked in ``__post_init__`` (and the
world-size dependent ones in :meth:`RunConfig.check_world_size`), so a bad config fails in milliseconds
with a message naming the field, the value and what is allowed.

Batch geometry (per sampling iteration): each of the P ranks samples ``sample.batch_size`` (B) images;
the P*B images are ``P*B / sample.group_size`` (G) prompts x G images, so G must divide P*B. An epoch is
``sample.num_batches_per_epoch`` iterations. Training splits each rank's samples into the same number of
micro-batches (same size as sampling: SD3's output depends slightly on batch size) and steps the
optimizer every ``train.gradient_accumulation_steps`` micro-batches (each micro-batch contributes one
backward pass per trained step).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration value: names the field, the value and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field_name, self.value, self.allowed = field_name, value, allowed
        super().__init__(f"invalid config: {field_name}={value!r}: {allowed}")


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(name, value, allowed)


SDE_TYPES = ("sde", "cps")
PRECISIONS = ("no", "fp16", "bf16")
FAMILIES = ("sd3", "flux", "flux_kontext", "wan", "qwen_image", "qwen_image_edit")
#: families whose samples are videos (latents [B, C, F, H, W]; model.num_frames applies)
VIDEO_FAMILIES = ("wan",)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelConfig:
    #: model family: selects the adapter (flowgrpo.models)
    family: str = "sd3"
    #: hub id, local diffusers directory, s3:// URI, or ``tiny`` / ``tiny:<spec>`` (built offline)
    path: str = "stabilityai/stable-diffusion-3.5-medium"
    #: hub revision (commit sha or tag); pin it for reproducible runs
    revision: str | None = None
    #: T5 tokens per prompt (upstream trains with 128)
    max_sequence_length: int = 128
    #: LoRA on the transformer (False = full fine-tune; the KL reference is then a frozen copy)
    use_lora: bool = True
    lora_rank: int = 32
    lora_alpha: int = 64
    #: module names to adapt; empty = the family's default attention projections
    lora_targets: list[str] = field(default_factory=list)
    #: compute precision of the transformer forward (autocast); master weights stay fp32
    mixed_precision: str = "fp16"
    #: video families (wan): frames per clip, 4k + 1; 0 = the model's default
    num_frames: int = 0
    #: torch.compile the transformer in place for sampling, training and evaluation (same fp32 math, fused
    #: kernels; each new batch shape, grad mode or LoRA on/off compiles once). Measured on bench_cpu: rollout
    #: and train step ~1.15x faster (README, Benchmarks)
    compile: bool = False

    def __post_init__(self) -> None:
        _check(self.family in FAMILIES, "model.family", self.family, f"one of {FAMILIES}")
        _check(bool(self.path), "model.path", self.path, "a hub id, a local directory, an s3:// URI or 'tiny'")
        _check(self.max_sequence_length >= 1, "model.max_sequence_length", self.max_sequence_length, "an int >= 1")
        _check(self.lora_rank >= 1, "model.lora_rank", self.lora_rank, "an int >= 1")
        _check(self.lora_alpha > 0, "model.lora_alpha", self.lora_alpha, "a number > 0")
        _check(self.mixed_precision in PRECISIONS, "model.mixed_precision", self.mixed_precision, f"one of {PRECISIONS}")
        if self.num_frames:
            _check(self.family in VIDEO_FAMILIES, "model.num_frames", self.num_frames,
                   f"0 for the image family {self.family!r} (frames apply to {VIDEO_FAMILIES})")
            _check(self.num_frames >= 1 and (self.num_frames - 1) % 4 == 0, "model.num_frames", self.num_frames,
                   "4k + 1 frames (1, 5, 9, ..., 33, 81): the video VAE compresses time 4x")


@dataclass
class DataConfig:
    #: training prompts: a .txt (one per line) or .jsonl (GenEval metadata with 'prompt') file, local or on a
    #: storage URI (s3://...), or builtin:<name>
    train_prompts: str = "builtin:animals"
    #: held-out prompts for periodic evaluation (same formats); empty = no prompt-based eval
    test_prompts: str = ""
    #: folder or s3:// prefix that relative source-image paths of edit prompt rows ("image") are read from; empty =
    #: the prompt file's folder (see flowgrpo.edit; sources on S3 are fetched once into the local cache)
    image_root: str = ""

    def __post_init__(self) -> None:
        _check(bool(self.train_prompts), "data.train_prompts", self.train_prompts, "a prompt file path or builtin:<name>")


@dataclass
class SampleConfig:
    #: image size in pixels (square)
    resolution: int = 512
    #: denoising steps of a training rollout
    num_steps: int = 10
    #: CFG scale of training rollouts; <= 1 means no CFG (one transformer call per step)
    guidance_scale: float = 4.5
    #: a in sigma_t = a sqrt(t / (1 - t)) ('sde') or the CPS angle fraction ('cps')
    noise_level: float = 0.7
    #: 'sde' (Flow-GRPO) or 'cps' (coefficients-preserving sampling)
    sde_type: str = "sde"
    #: Flow-GRPO-Fast: number of consecutive SDE (and trained) steps; 0 = every step is SDE
    sde_window_size: int = 0
    #: the window starts uniformly in [lo, hi - size]
    sde_window_range: list[int] = field(default_factory=lambda: [0, 10])
    #: without a window, train the first int(num_steps * timestep_fraction) steps
    timestep_fraction: float = 0.99
    #: identical initial noise for the G images of a prompt (step noise stays per image)
    same_latent: bool = False
    #: images per rank per sampling iteration (also the training micro-batch size)
    batch_size: int = 9
    #: sampling iterations per epoch
    num_batches_per_epoch: int = 4
    #: G: images per prompt (the GRPO group)
    group_size: int = 24

    def __post_init__(self) -> None:
        _check(self.resolution >= 8 and self.resolution % 8 == 0, "sample.resolution", self.resolution,
               "a multiple of 8 (the VAE factor)")
        _check(self.num_steps >= 2, "sample.num_steps", self.num_steps, "an int >= 2")
        _check(self.guidance_scale >= 0, "sample.guidance_scale", self.guidance_scale, "a number >= 0 (<= 1: no CFG)")
        _check(self.sde_type in SDE_TYPES, "sample.sde_type", self.sde_type, f"one of {SDE_TYPES}")
        _check(0 < self.noise_level <= (1.0 if self.sde_type == "cps" else 2.0), "sample.noise_level",
               self.noise_level, "in (0, 1] for cps, (0, 2] for sde (paper: 0.7)")
        _check(self.sde_window_size >= 0, "sample.sde_window_size", self.sde_window_size, "an int >= 0 (0 = no window)")
        rng = self.sde_window_range
        _check(isinstance(rng, (list, tuple)) and len(rng) == 2, "sample.sde_window_range", rng, "a pair [lo, hi]")
        self.sde_window_range = [int(rng[0]), int(rng[1])]
        if self.sde_window_size > 0:
            lo, hi = self.sde_window_range
            _check(0 <= lo < hi <= self.num_steps, "sample.sde_window_range", rng,
                   f"0 <= lo < hi <= sample.num_steps ({self.num_steps})")
            _check(self.sde_window_size <= hi - lo, "sample.sde_window_size", self.sde_window_size,
                   f"at most hi - lo = {hi - lo} (sample.sde_window_range={rng})")
        _check(0 < self.timestep_fraction <= 1, "sample.timestep_fraction", self.timestep_fraction, "in (0, 1]")
        _check(self.batch_size >= 1, "sample.batch_size", self.batch_size, "an int >= 1")
        _check(self.num_batches_per_epoch >= 1, "sample.num_batches_per_epoch", self.num_batches_per_epoch, "an int >= 1")
        _check(self.group_size >= 1, "sample.group_size", self.group_size, "an int >= 1 (24 in the paper)")

    @property
    def num_train_steps(self) -> int:
        """Trained transitions per trajectory."""
        if self.sde_window_size > 0:
            return self.sde_window_size
        return max(1, int(self.num_steps * self.timestep_fraction))

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass
class TrainConfig:
    epochs: int = 1
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    #: micro-batches per optimizer step (upstream: num_batches_per_epoch / 2 -> 2 updates per epoch)
    gradient_accumulation_steps: int = 2
    num_inner_epochs: int = 1
    #: PPO clip epsilon on the per-element-mean log-ratio
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    #: KL coefficient beta (0 disables the reference forward)
    beta: float = 0.04
    #: KL with the paper's sigma_t^2 dt denominator (True) or upstream's sigma_t^2 (False)
    kl_uses_dt: bool = False
    #: advantages: per-prompt mean, std over the whole epoch batch (True) or per prompt (False)
    global_std: bool = True
    #: group-normalise rewards per prompt (False: z-score over the whole batch)
    per_prompt_stat_tracking: bool = True
    #: skip zero-advantage samples (identical rewards in a group) when training
    filter_zero_std: bool = True
    #: GRPO-Guard: RatioNorm + per-step gradient reweighting
    guard: bool = False
    #: grpo (default), dpo / online_dpo (preference pairs within groups), sft / online_sft (best-of-group);
    #: the offline variants learn from the reference policy's samples (see flowgrpo.objectives)
    objective: str = "grpo"
    #: DPO temperature on mean-over-dims transition log-probs
    dpo_beta: float = 200.0
    shuffle: bool = True
    ema: bool = True
    ema_decay: float = 0.9
    ema_update_every: int = 8
    #: DeepSpeed ZeRO stage through accelerate (0 = off)
    deepspeed_stage: int = 0
    #: save a checkpoint every N epochs (0 = only at the end)
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    #: threads scoring rewards while sampling continues
    reward_workers: int = 2

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "train.epochs", self.epochs, "an int >= 0")
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "a number > 0")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "train.adam_beta1/adam_beta2",
               (self.adam_beta1, self.adam_beta2), "each in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.max_grad_norm > 0, "train.max_grad_norm", self.max_grad_norm, "a number > 0")
        _check(self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps",
               self.gradient_accumulation_steps, "an int >= 1")
        _check(self.num_inner_epochs >= 1, "train.num_inner_epochs", self.num_inner_epochs, "an int >= 1")
        _check(self.clip_range > 0, "train.clip_range", self.clip_range, "a number > 0 (paper: 1e-4)")
        _check(self.adv_clip_max > 0, "train.adv_clip_max", self.adv_clip_max, "a number > 0 (paper: 5)")
        _check(self.beta >= 0, "train.beta", self.beta, "a number >= 0")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in [0, 1)")
        _check(self.ema_update_every >= 1, "train.ema_update_every", self.ema_update_every, "an int >= 1")
        _check(self.deepspeed_stage in (0, 1, 2, 3), "train.deepspeed_stage", self.deepspeed_stage, "0 (off), 1, 2 or 3")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, "an int >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "an int >= 1")
        _check(self.reward_workers >= 1, "train.reward_workers", self.reward_workers, "an int >= 1")
        from flowgrpo.objectives import OBJECTIVES

        _check(self.objective in OBJECTIVES, "train.objective", self.objective, f"one of {OBJECTIVES}")
        _check(self.dpo_beta > 0, "train.dpo_beta", self.dpo_beta, "a number > 0")
        if self.objective != "grpo":
            _check(not self.guard, "train.guard", self.guard, "GRPO-Guard applies to objective=grpo only")


@dataclass
class EvalConfig:
    #: evaluate every N epochs, including epoch 0 (0 disables)
    every: int = 20
    #: ODE steps of evaluation sampling
    num_steps: int = 40
    guidance_scale: float = 4.5
    batch_size: int = 16
    #: how many test prompts (0 = all)
    num_prompts: int = 0

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", self.every, "an int >= 0 (0 disables)")
        _check(self.num_steps >= 1, "eval.num_steps", self.num_steps, "an int >= 1")
        _check(self.guidance_scale >= 0, "eval.guidance_scale", self.guidance_scale, "a number >= 0")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an int >= 1")
        _check(self.num_prompts >= 0, "eval.num_prompts", self.num_prompts, "an int >= 0 (0 = all)")


@dataclass
class StorageConfig:
    #: where checkpoints go: empty = <output_dir>/checkpoints; or any storage URI (s3://bucket/prefix, a path)
    checkpoint_uri: str = ""
    #: where the final diffusers-format model is published: empty = <output_dir>/final; or a storage URI
    final_uri: str = ""


@dataclass
class TrackingConfig:
    #: log to MLflow (rank 0); metrics.jsonl is always written
    enabled: bool = True
    #: MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else the embedded sqlite store under the state dir
    tracking_uri: str = ""
    experiment: str = "flowgrpo"
    run_name: str = ""
    #: fail at start when the tracking server is unreachable (False: continue with metrics.jsonl only)
    required: bool = True
    #: log a training image grid every N epochs
    image_every: int = 10

    def __post_init__(self) -> None:
        _check(self.image_every >= 1, "tracking.image_every", self.image_every, "an int >= 1")


@dataclass
class RunConfig:
    #: where metrics.jsonl, checkpoints/ and final/ go
    output_dir: str = "runs/flowgrpo"
    seed: int = 42
    device: str = "auto"
    #: CPU runs: tune glibc malloc so activations are reused instead of page-faulted in again (flowgrpo.runtime)
    malloc_tune: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    #: reward name -> weight; the training reward is the weighted sum (weight 0 = logged only)
    reward: dict[str, float] = field(default_factory=lambda: {"jpeg_compressibility": 1.0})
    #: per-reward constructor options, e.g. {"pickscore": {"model": "yuvalkirstain/PickScore_v1"},
    #: "geneval": {"url": "http://reward-geneval:8000"}}; a ``url`` scores through a reward server
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from flowgrpo.rewards import KNOWN_REWARDS

        _check(self.device in DEVICES, "device", self.device, f"one of {DEVICES}")
        _check(isinstance(self.reward, dict) and len(self.reward) > 0, "reward", self.reward,
               "a non-empty mapping {reward_name: weight}")
        for name, w in self.reward.items():
            _check(name in KNOWN_REWARDS, f"reward.{name}", w, f"a known reward name: {sorted(KNOWN_REWARDS)}")
            _check(isinstance(w, (int, float)) and not isinstance(w, bool), f"reward.{name}", w, "a number")
        _check(any(w != 0 for w in self.reward.values()), "reward", self.reward, "at least one non-zero weight")
        for name, opts in self.reward_options.items():
            _check(name in self.reward, f"reward_options.{name}", opts,
                   f"options for a reward listed in `reward` ({sorted(self.reward)})")
        s, t = self.sample, self.train
        _check(s.num_batches_per_epoch % t.gradient_accumulation_steps == 0, "train.gradient_accumulation_steps",
               t.gradient_accumulation_steps,
               f"a divisor of sample.num_batches_per_epoch ({s.num_batches_per_epoch}) so every epoch ends on an optimizer step")
        if t.guard:
            _check(s.sde_type == "sde", "train.guard", t.guard, "GRPO-Guard is defined for sample.sde_type='sde' only")
        if t.objective != "grpo":
            _check(s.group_size > 1, "sample.group_size", s.group_size,
                   f"> 1 for train.objective={t.objective} (preferences and best-of-group compare images of a prompt)")
        if s.same_latent and s.group_size == 1:
            raise ConfigError("sample.same_latent", True, "needs sample.group_size > 1")
        if self.model.compile:
            _check(t.deepspeed_stage == 0, "model.compile", True,
                   "false with train.deepspeed_stage > 0 (DeepSpeed wraps the module itself; compile is untested there)")

    def check_world_size(self, world_size: int) -> None:
        """Invariants that depend on the number of ranks (checked before any model is built)."""
        s = self.sample
        global_batch = s.batch_size * world_size
        if global_batch % s.group_size:
            divisors = [b for b in range(1, 4 * s.group_size + 1) if (b * world_size) % s.group_size == 0][:4]
            raise ConfigError(
                "sample.group_size", s.group_size,
                f"must divide sample.batch_size x world_size = {s.batch_size} x {world_size} = {global_batch} "
                f"(every prompt's group must be complete within one sampling iteration); "
                f"e.g. sample.batch_size in {divisors}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- I/O

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert a YAML or override value against a dataclass field annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(name, value, f"a mapping of {tp.__name__} fields")
        return _build(tp, value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(name, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(name, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(name, value, "a string")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, value, "a list")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, value, "a mapping")
        return {str(k): _coerce(f"{name}.{k}", v, args[1]) for k, v in value.items()} if args else dict(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(path, value, f"not a field; known fields of {prefix or 'the run config'}: {sorted(known)}")
        kwargs[key] = _coerce(path, value, hints[key])
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(key, value, f"'{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.epochs=3", "reward.ocr=0.5"]`` -> [(key, YAML-parsed value)]."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, None, "overrides are key=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else "")) 
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML preset (or the defaults), apply dotted overrides, validate everything."""
    tree: dict[str, Any] = {}
    if path is not None:
        if str(path).startswith("s3://"):  # the pipeline's resolved config, published next to the run
            from flowgrpo import storage

            try:
                text = storage.read_text(str(path))
            except storage.StorageError as e:
                raise ConfigError("--config", str(path), f"a readable YAML object ({e})") from e
        else:
            p = Path(path)
            if not p.is_file():
                raise ConfigError("--config", str(path), "an existing YAML file (see configs/)")
            text = p.read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ConfigError("--config", str(path), "a YAML mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        if key.startswith("reward.") and value is None:  # reward.ocr=null removes a reward
            tree.get("reward", {}).pop(key.split(".", 1)[1], None)
            continue
        _set_dotted(tree, key, value)
    return _build(RunConfig, tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
