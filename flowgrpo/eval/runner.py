"""Evaluate a model on named suites: the same prompts, seeds and ODE sampler for every model, so the
trained model and its base are compared image for image.

Suites (``build_suite``):
  ``preset``    the training preset's held-out prompts (``data.test_prompts``) and its own rewards, scored
                in-process (reward-server URLs are dropped: the servers are gone by evaluation time);
  ``geneval``   ``<data_root>/geneval/test_metadata.jsonl`` scored by the GenEval rules + detector;
  ``drawbench`` ``<data_root>/drawbench/test.txt`` scored by PickScore, aesthetic and CLIPScore.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowgrpo.config import RunConfig
from flowgrpo.prompts import PromptSet, load_prompts

SUITES = ("preset", "geneval", "drawbench")


@dataclass
class Suite:
    name: str
    prompts: PromptSet
    reward: dict[str, float]
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class EvalSettings:
    num_steps: int = 40
    guidance_scale: float = 4.5
    resolution: int = 512
    batch_size: int = 8
    num_prompts: int = 0  # 0 = all
    seed: int = 0
    device: str = "cpu"
    mixed_precision: str = "no"
    max_sequence_length: int = 128

    @classmethod
    def from_config(cls, cfg: RunConfig) -> EvalSettings:
        e = cfg.eval
        return cls(num_steps=e.num_steps, guidance_scale=e.guidance_scale, resolution=cfg.sample.resolution,
                   batch_size=e.batch_size, num_prompts=e.num_prompts, seed=cfg.seed,
                   device="cpu" if cfg.device == "cpu" else "auto", mixed_precision=cfg.model.mixed_precision,
                   max_sequence_length=cfg.model.max_sequence_length)


@dataclass
class SuiteResult:
    suite: str
    metrics: dict[str, float]  # "<suite>/<reward>" (and "<suite>/avg": the weighted sum) -> mean
    images: np.ndarray  # [N, H, W, 3] uint8, the first grid_size images
    captions: list[str]
    seconds: float


def build_suite(name: str, cfg: RunConfig, data_root: str | None = None) -> Suite:
    """The suite ``name`` for a run configured by ``cfg`` (see the module docstring)."""
    if name == "preset":
        spec = cfg.data.test_prompts or cfg.data.train_prompts
        opts = {k: {o: v for o, v in d.items() if o != "url"} for k, d in cfg.reward_options.items()}
        return Suite(name, load_prompts(spec), dict(cfg.reward), {k: v for k, v in opts.items() if v})
    if name in ("geneval", "drawbench"):
        if not data_root:
            raise ValueError(f"eval suite {name!r} needs eval_data_root (a directory with {name}/ prompt files)")
        if name == "geneval":
            return Suite(name, load_prompts(str(Path(data_root) / "geneval" / "test_metadata.jsonl")),
                         {"geneval": 1.0})
        return Suite(name, load_prompts(str(Path(data_root) / "drawbench" / "test.txt")),
                     {"pickscore": 1.0, "aesthetic": 0.0, "clipscore": 0.0})
    raise ValueError(f"unknown eval suite {name!r}; known suites: {list(SUITES)}")


def evaluate_model(model_path: str, suites: list[Suite], settings: EvalSettings, family: str = "sd3",
                   grid_size: int = 16) -> list[SuiteResult]:
    """Sample every suite's prompts with ``model_path`` (a directory or storage URI) and score them."""
    import torch
    from tqdm.auto import tqdm

    from flowgrpo.distributed import seed_for
    from flowgrpo.models import load_adapter
    from flowgrpo.recipe import pick_device
    from flowgrpo.rewards import WeightedReward
    from flowgrpo.rollout import rollout, to_uint8

    device = pick_device(settings.device)
    adapter = load_adapter(family, model_path, device=str(device), mixed_precision=settings.mixed_precision,
                           max_sequence_length=settings.max_sequence_length, needs_reference=False)
    adapter.transformer.eval()
    negative = adapter.encode_prompts([""]) if settings.guidance_scale > 1 else None
    sigmas = adapter.sigmas(settings.num_steps).to(device)
    results = []
    for suite in suites:
        t0 = time.perf_counter()
        reward_fn = WeightedReward(suite.reward, options=suite.reward_options)
        n = len(suite.prompts) if not settings.num_prompts else min(settings.num_prompts, len(suite.prompts))
        scores: dict[str, list[float]] = {}
        grid, caps = [], []
        for start in tqdm(range(0, n, settings.batch_size), desc=f"eval {suite.name}", leave=False):
            idx = list(range(start, min(n, start + settings.batch_size)))
            prompts = [suite.prompts.prompts[i] for i in idx]
            meta = [suite.prompts.metadata[i] for i in idx]
            with torch.no_grad():
                images, *_ = rollout(adapter, adapter.encode_prompts(prompts), negative, sigmas=sigmas, window=None,
                                     guidance_scale=settings.guidance_scale, noise_level=0.0, sde_type="sde",
                                     sample_seeds=[seed_for(settings.seed, "eval", i) for i in idx],
                                     resolution=settings.resolution)
            u8 = to_uint8(images)
            r = reward_fn(u8, prompts, meta)
            for k, v in r.items():
                scores.setdefault(k, []).extend(float(x) for x in v)
            for j in range(len(idx)):
                if len(grid) < grid_size:
                    grid.append(u8[j])
                    caps.append(f"{prompts[j][:40]} r={r['avg'][j]:.4f}")
        metrics = {f"{suite.name}/{k}": float(np.mean(v)) for k, v in scores.items()}
        metrics[f"{suite.name}/n"] = float(n)
        results.append(SuiteResult(suite.name, metrics, np.stack(grid) if grid else np.zeros((0, 1, 1, 3), np.uint8),
                                   caps, time.perf_counter() - t0))
    return results
