"""``flowgrpo bench shapes``: offline proof that Flow-GRPO learns, on the shapes world.

1. The base model: the pretrained shapes SD3 (:mod:`flowgrpo.models.pretrain`, built once into the cache).
2. Its held-out score: ODE samples (``eval`` settings of ``configs/shapes_cpu.yaml``) of tag-balanced prompts of
   the shapes **test** split, judged by the shapes detector with the GenEval rules: ``overall`` = GenEval's number
   (mean over tags of the standard verdict's accuracy), ``reward`` = mean partial-credit reward (the training
   reward), per-tag accuracies. ``--eval-prompts FILE`` evaluates a prompt file of shapes-world rows instead
   (:func:`load_eval_prompts`; e.g. the held-out triangles only) and adds each prompt's accuracy (``per_prompt``).
3. Flow-GRPO variants trained from the base for a fixed **CPU budget** (this process's user + system seconds, so
   other processes on the machine do not shrink it; wall seconds are reported too), evaluated the same way at a
   few points of the budget (evaluation time is not counted): ``flowgrpo`` (the preset: full SDE, CFG-free),
   ``fast_nocfg`` (Flow-GRPO-Fast window, CPS, CFG-free), ``flowgrpo_cfg`` (full SDE with CFG 4.5, sampled
   and evaluated with it) and, with ``--guard``, ``guard`` (``flowgrpo`` + GRPO-Guard). Each is compared with the
   base sampled at the variant's own guidance scale.
4. Gold metrics the proxy reward does not see (over-optimisation check): ``exact_scene`` (the image holds exactly
   the requested objects - no extra shapes of other classes, which the GenEval rules ignore - and is strictly
   correct), ``junk`` (fraction of pixels of a palette colour that belong to no detected shape), ``diversity``
   (mean pixel distance between the images of one prompt under different seeds; collapse drives it down).

The training loop is :class:`~flowgrpo.recipe.GRPORecipe`'s own (``sample_epoch`` / ``compute_advantages`` /
``train_epoch``), driven epoch by epoch so the bench can stop on the budget and evaluate in between.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "shapes_cpu.yaml"

#: variant name -> config overrides on top of configs/shapes_cpu.yaml (whose own setting, full SDE without CFG,
#: is ``flowgrpo``); each variant is evaluated at its own ``eval.guidance_scale`` against the base at the same one
VARIANTS: dict[str, list[str]] = {
    "flowgrpo": [],
    # Flow-GRPO-Fast + no CFG: 2 SDE steps in the first half of the schedule, CPS, guidance 1 (train and eval)
    "fast_nocfg": ["sample.sde_window_size=2", "sample.sde_window_range=[0,5]", "sample.sde_type=cps",
                   "sample.noise_level=0.8", "train.clip_range=2.0e-3"],
    # the paper's default: full SDE with CFG 4.5 when sampling, training and evaluating
    "flowgrpo_cfg": ["sample.guidance_scale=4.5", "eval.guidance_scale=4.5", "train.learning_rate=1.0e-4"],
    "guard": ["train.guard=true"],
}


# ---------------------------------------------------------------------------------------------- gold metrics


def _wanted(row: dict[str, Any]) -> Counter:
    return Counter({(c.get("color"), c["class"]): int(c["count"]) for c in row["include"]})


def judge_image(image: np.ndarray, row: dict[str, Any]) -> dict[str, Any]:
    """Proxy and gold judgements of one uint8 [H, W, 3] image against a shapes metadata row:
    ``correct`` / ``strict`` / ``reward`` (GenEval standard verdict, exact-count verdict, partial credit) and the
    gold ``exact_scene`` (strict and the detections are exactly the requested objects) and ``junk`` (fraction
    of palette-coloured pixels outside every detected shape)."""
    from flowgrpo.eval import shapes as S
    from flowgrpo.rewards.geneval.rules import evaluate, filter_detections

    dets = S.detect(image, masks=True)
    res = evaluate(row, dets)
    kept = [d for ds in filter_detections(dets, row.get("tag")).values() for d in ds]
    exact = bool(res.strict_correct) and Counter((d.color, d.cls) for d in kept) == _wanted(row)
    coloured = S.segment(image) >= 0
    covered = np.zeros(coloured.shape, dtype=bool)
    for d in dets:
        covered |= d.mask
    junk = float((coloured & ~covered).sum() / coloured.size)
    return {"correct": bool(res.correct), "strict": bool(res.strict_correct), "reward": float(res.score),
            "exact_scene": exact, "junk": junk, "tag": row.get("tag", "")}


def diversity(images: np.ndarray, groups: Sequence[int]) -> float:
    """Mean absolute pixel difference (in [0, 1]) between images of the same group (prompt), over all pairs."""
    by: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(int(g), []).append(i)
    x = images.astype(np.float32) / 255.0
    d = [float(np.abs(x[a] - x[b]).mean()) for idx in by.values() for a, b in itertools.combinations(idx, 2)]
    return float(np.mean(d)) if d else 0.0


def summarize(judgements: Sequence[dict[str, Any]], images: np.ndarray | None = None,
              groups: Sequence[int] | None = None) -> dict[str, Any]:
    """GenEval-style aggregates: ``overall`` (mean of per-tag accuracies), ``per_tag``, ``reward``, ``strict``
    (mean of per-tag exact-count accuracies) and the gold metrics."""
    tags = sorted({j["tag"] for j in judgements})
    per_tag = {t: float(np.mean([j["correct"] for j in judgements if j["tag"] == t])) for t in tags}
    strict_tag = {t: float(np.mean([j["strict"] for j in judgements if j["tag"] == t])) for t in tags}
    exact_tag = {t: float(np.mean([j["exact_scene"] for j in judgements if j["tag"] == t])) for t in tags}
    out = {"overall": float(np.mean(list(per_tag.values()))), "per_tag": per_tag,
           "reward": float(np.mean([j["reward"] for j in judgements])),
           "strict": float(np.mean(list(strict_tag.values()))),
           "gold": {"exact_scene": float(np.mean(list(exact_tag.values()))), "exact_scene_per_tag": exact_tag,
                    "junk": float(np.mean([j["junk"] for j in judgements]))},
           "n_images": len(judgements)}
    if images is not None and groups is not None:
        out["gold"]["diversity"] = diversity(images, groups)
    return out


# ------------------------------------------------------------------------------------------------ evaluation


def generate(adapter: Any, prompts: Sequence[str], *, resolution: int, num_steps: int, guidance_scale: float,
             seeds: Sequence[int], batch_size: int = 32, negative: Any = None) -> np.ndarray:
    """uint8 [N, H, W, 3]: deterministic ODE samples (the recipe's evaluation sampler), one seed per prompt."""
    import torch

    from flowgrpo.rollout import rollout, to_uint8

    sigmas = adapter.sigmas(num_steps)
    out = []
    with torch.no_grad():
        if guidance_scale > 1 and negative is None:
            negative = adapter.encode_prompts([""])
        for i in range(0, len(prompts), batch_size):
            ps = list(prompts[i: i + batch_size])
            cond = adapter.encode_prompts(ps)
            images, *_ = rollout(adapter, cond, negative, sigmas=sigmas, window=None, guidance_scale=guidance_scale,
                                 noise_level=0.0, sde_type="sde", sample_seeds=list(seeds[i: i + batch_size]),
                                 resolution=resolution)
            out.append(to_uint8(images))
    return np.concatenate(out)


def load_eval_prompts(spec: str) -> Any:
    """A prompt file (:func:`~flowgrpo.prompts.load_prompts`: a .jsonl path, ``s3://`` or ``builtin:``) whose every
    row is a shapes-world GenEval row (``tag``, ``include`` clauses of the world's shapes and colours), checked
    before anything is sampled: the detector could never find anything else, so such a prompt would score 0."""
    from flowgrpo.eval import shapes as S
    from flowgrpo.prompts import load_prompts
    from flowgrpo.rewards.geneval.rules import TAGS

    ps = load_prompts(spec)
    if not len(ps):
        raise ValueError(f"{spec}: no prompts (--eval-prompts wants a .jsonl of shapes-world rows)")
    for i, row in enumerate(ps.metadata, start=1):
        where = f"{spec}: row {i} ({row.get('prompt', '')!r})"
        if row.get("tag") not in TAGS:
            raise ValueError(f"{where}: 'tag' must be one of {TAGS}, got {row.get('tag')!r} "
                             "(write rows with flowgrpo.eval.shapes.split_prompts / write_jsonl)")
        clauses = row.get("include")
        if not isinstance(clauses, list) or not clauses:
            raise ValueError(f"{where}: needs a non-empty 'include' list of GenEval clauses")
        for c in clauses:
            if c.get("class") not in S.SHAPES or c.get("color") not in (None, *S.COLORS):  # colour optional
                raise ValueError(f"{where}: clause {c} is not a shapes-world object (class one of {S.SHAPES}, "
                                 f"color one of {S.COLORS})")
    return ps


def eval_prompts(n_per_tag: int, split: str = "test", seed: int = 0, tags: Sequence[str] | None = None):
    """A tag-balanced :class:`~flowgrpo.prompts.PromptSet` of the shapes ``split``."""
    from flowgrpo.eval import shapes as S
    from flowgrpo.rewards.geneval.rules import TAGS

    tags = list(tags or TAGS)
    return S.prompt_set(n_per_tag * len(tags), seed=seed, split=split, tags=tags)


def evaluate_adapter(adapter: Any, prompts: Any, *, resolution: int, num_steps: int, guidance_scale: float,
                     seeds_per_prompt: int = 2, seed: int = 0, batch_size: int = 32,
                     per_image: bool = False, per_prompt: bool = False) -> dict[str, Any]:
    """Sample every prompt of ``prompts`` (a PromptSet with metadata) with ``seeds_per_prompt`` seeds and
    :func:`summarize` the judgements (diversity over the seeds of each prompt); ``per_image``: also return every
    image's judgement under ``judgements`` (prompt-major, seeds inner); ``per_prompt``: also each prompt's
    accuracy over its images under ``per_prompt`` (prompt text -> fraction correct)."""
    n = len(prompts)
    flat_prompts = [p for p in prompts.prompts for _ in range(seeds_per_prompt)]
    rows = [m for m in prompts.metadata for _ in range(seeds_per_prompt)]
    groups = [i for i in range(n) for _ in range(seeds_per_prompt)]
    seeds = [1_000_003 * seed + 7919 * i + k for i in range(n) for k in range(seeds_per_prompt)]
    t0 = time.perf_counter()
    images = generate(adapter, flat_prompts, resolution=resolution, num_steps=num_steps,
                      guidance_scale=guidance_scale, seeds=seeds, batch_size=batch_size)
    judgements = [judge_image(im, row) for im, row in zip(images, rows)]
    out = summarize(judgements, images, groups)
    out["eval_s"] = round(time.perf_counter() - t0, 1)
    if per_prompt:
        verdicts: dict[str, list[bool]] = {}
        for p, j in zip(flat_prompts, judgements):
            verdicts.setdefault(p, []).append(bool(j["correct"]))
        out["per_prompt"] = {p: float(np.mean(v)) for p, v in verdicts.items()}
    if per_image:
        out["judgements"] = judgements
    return out


# -------------------------------------------------------------------------------------------------- training


def _cpu_seconds() -> float:
    t = os.times()
    return t[0] + t[1]


def write_prompt_files(out_dir: Path) -> list[str]:
    """Write the preset's train / test prompt sets (``builtin:shapes_*``) as GenEval jsonl files under
    ``out_dir`` (a record of exactly what was trained on); returns the config overrides pointing
    ``data.train_prompts`` / ``data.test_prompts`` at them."""
    from flowgrpo.eval import shapes as S

    out_dir.mkdir(parents=True, exist_ok=True)
    train = S.write_jsonl(S.builtin_prompt_set("train"), out_dir / "shapes_train.jsonl")
    test = S.write_jsonl(S.builtin_prompt_set("test"), out_dir / "shapes_test.jsonl")
    return [f"data.train_prompts={train}", f"data.test_prompts={test}"]


def _load_cfg(overrides: Sequence[str], out_dir: Path, model_path: str) -> Any:
    from flowgrpo.config import load_config

    return load_config(PRESET, [*write_prompt_files(out_dir / "prompts"), f"model.path={model_path}",
                                f"output_dir={out_dir}", "tracking.enabled=false", "eval.every=0", *overrides])


def train_variant(name: str, overrides: Sequence[str], model_path: str, *, cpu_budget_s: float, eval_points: int,
                  eval_set: Any, n_seeds: int, out_dir: Path, log: Any = None, max_epochs: int = 10_000,
                  train_eval_set: Any = None, per_prompt: bool = False) -> dict[str, Any]:
    """Train one variant from the base for ``cpu_budget_s`` CPU seconds; evaluate at ``eval_points`` equally spaced
    points of the budget (and at the end; ``per_prompt``: with each prompt's accuracy). Returns the curve and the
    final evaluation."""
    from flowgrpo.recipe import GRPORecipe

    cfg = _load_cfg([*VARIANTS.get(name, []), *overrides, f"train.epochs={max_epochs}"], out_dir, model_path)
    recipe = GRPORecipe(cfg, resume="never")
    recipe.setup()
    e = cfg.eval
    ev = dict(resolution=cfg.sample.resolution, num_steps=e.num_steps, guidance_scale=e.guidance_scale,
              seeds_per_prompt=n_seeds, batch_size=e.batch_size)
    curve: list[dict[str, Any]] = []
    marks = [cpu_budget_s * (k + 1) / max(1, eval_points) for k in range(max(1, eval_points))]
    cpu_used = wall_used = 0.0
    epoch = 0
    rewards: list[float] = []
    try:
        while cpu_used < cpu_budget_s and epoch < max_epochs:
            c0, w0 = _cpu_seconds(), time.perf_counter()
            samples = recipe.sample_epoch(epoch)
            adv, stats = recipe.compute_advantages(samples)
            rec = recipe.train_epoch(epoch, samples.traj, adv)
            cpu_used += _cpu_seconds() - c0
            wall_used += time.perf_counter() - w0
            rewards.append(stats["reward_mean"])
            if log:
                log(f"{name} epoch {epoch}: train reward {stats['reward_mean']:.3f} clipfrac "
                    f"{rec.get('clipfrac', float('nan')):.3f} cpu {cpu_used:.0f}/{cpu_budget_s:.0f}s wall {wall_used:.0f}s")
            epoch += 1
            if marks and (cpu_used >= marks[0] or cpu_used >= cpu_budget_s):
                while marks and cpu_used >= marks[0]:
                    marks.pop(0)
                with _ema(recipe):
                    point = evaluate_adapter(recipe.adapter, eval_set, per_prompt=per_prompt, **ev)
                point.update(epochs=epoch, cpu_s=round(cpu_used, 1), wall_s=round(wall_used, 1),
                             train_reward=float(np.mean(rewards[-3:])))
                curve.append(point)
                if log:
                    log(f"{name} eval @ cpu {cpu_used:.0f}s: overall {point['overall']:.3f} reward "
                        f"{point['reward']:.3f} exact {point['gold']['exact_scene']:.3f}")
        final = dict(curve[-1]) if curve else {}
        if train_eval_set is not None:
            with _ema(recipe):
                final["train_prompts"] = evaluate_adapter(recipe.adapter, train_eval_set, **ev)
    finally:
        recipe.cleanup()
    return {"overrides": [*VARIANTS.get(name, []), *overrides], "epochs": epoch, "cpu_s": round(cpu_used, 1),
            "wall_s": round(wall_used, 1), "images": epoch * cfg.sample.batch_size * cfg.sample.num_batches_per_epoch,
            "train_reward_curve": [round(r, 4) for r in rewards], "curve": curve, "final": final}


class _ema:
    def __init__(self, recipe: Any):
        self.ctx = recipe.ema.swapped() if getattr(recipe, "ema", None) is not None else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc: Any):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


def _compact(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ev.items()}


def run_shapes_bench(*, model: str = "shapes", variants: Sequence[str] = ("flowgrpo", "fast_nocfg"),
                     cpu_budget_s: float = 600.0, eval_points: int = 3, n_per_tag: int = 16, n_seeds: int = 2,
                     overrides: Sequence[str] = (), threads: int | None = None, out_dir: str | None = None,
                     log: Any = None, eval_file: str | None = None) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); returns a JSON-able dict. ``eval_file``: evaluate that
    prompt file (:func:`load_eval_prompts`) instead of ``n_per_tag`` tag-balanced test-split prompts."""
    import torch

    from flowgrpo.bench.common import CpuMonitor, environment
    from flowgrpo.models import load_adapter
    from flowgrpo.models.loading import resolve_model_path
    from flowgrpo.models.pretrain import read_info
    from flowgrpo.recipe import _quiet_libraries

    file_set = load_eval_prompts(eval_file) if eval_file else None  # a bad file fails before the model is built
    if threads:
        torch.set_num_threads(int(threads))
    _quiet_libraries()
    env = environment()
    t0 = time.perf_counter()
    local = resolve_model_path(model)
    build_s = time.perf_counter() - t0
    info = read_info(local)
    root = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="flowgrpo-bench-shapes-"))
    base_cfg = _load_cfg(list(overrides), root, str(local))
    e = base_cfg.eval
    guidance = {name: _load_cfg([*VARIANTS[name], *overrides], root, str(local)).eval.guidance_scale
                for name in variants}
    test_set = file_set if file_set is not None else eval_prompts(n_per_tag, "test", seed=0)
    train_set = eval_prompts(max(2, n_per_tag // 2), "train", seed=1)
    ev = dict(resolution=base_cfg.sample.resolution, num_steps=e.num_steps, seeds_per_prompt=n_seeds,
              batch_size=e.batch_size)
    by_prompt = file_set is not None
    adapter = load_adapter("sd3", str(local), max_sequence_length=base_cfg.model.max_sequence_length,
                           mixed_precision="no", needs_reference=False)
    result: dict[str, Any] = {
        "bench": "shapes", "model": model, "model_dir": str(local), "environment": env,
        "pretrain": {"seconds": info.get("seconds"), "vae_seconds": info.get("vae_seconds"),
                     "flow_steps": info.get("flow_steps_done"), "flow_loss_first": info.get("flow_loss_first"),
                     "flow_loss_last": info.get("flow_loss_last"), "stopped_early": info.get("stopped_early"),
                     "built_now_s": round(build_s, 1) if build_s > 5 else 0.0},
        "eval": {"n_prompts": len(test_set), "seeds_per_prompt": n_seeds, "num_steps": e.num_steps,
                 "split": "file" if eval_file else "test", "prompts": eval_file or f"{n_per_tag} per tag"},
        "cpu_budget_s": cpu_budget_s,
    }
    with CpuMonitor() as mon:
        base = {}
        for g in sorted(set(guidance.values()) or {e.guidance_scale}, reverse=True):
            base[f"cfg{g:g}"] = evaluate_adapter(adapter, test_set, guidance_scale=g, per_prompt=by_prompt, **ev)
            base[f"cfg{g:g}"]["train_prompts"] = evaluate_adapter(adapter, train_set, guidance_scale=g, **ev)
            if log:
                log(f"base (guidance {g:g}): overall {base[f'cfg{g:g}']['overall']:.3f}")
        del adapter
        result["base"] = base
        runs = {}
        for name in variants:
            runs[name] = train_variant(name, list(overrides), str(local), cpu_budget_s=cpu_budget_s,
                                       eval_points=eval_points, eval_set=test_set, n_seeds=n_seeds,
                                       out_dir=root / name, log=log, train_eval_set=train_set,
                                       per_prompt=by_prompt)
        result["variants"] = runs
    result["cpu"] = mon.report()
    summary = {}
    for name, r in runs.items():
        g = guidance[name]
        b = base[f"cfg{g:g}"]
        f = r["final"]
        if not f:
            continue
        summary[name] = {
            "base_overall": round(b["overall"], 4), "trained_overall": round(f["overall"], 4),
            "delta_overall": round(f["overall"] - b["overall"], 4),
            "base_reward": round(b["reward"], 4), "trained_reward": round(f["reward"], 4),
            "base_exact_scene": round(b["gold"]["exact_scene"], 4),
            "trained_exact_scene": round(f["gold"]["exact_scene"], 4),
            "base_diversity": round(b["gold"].get("diversity", 0.0), 4),
            "trained_diversity": round(f["gold"].get("diversity", 0.0), 4),
            "per_tag_base": {k: round(v, 3) for k, v in b["per_tag"].items()},
            "per_tag_trained": {k: round(v, 3) for k, v in f["per_tag"].items()},
            "guidance_scale": g,
            "train_prompts_reward": [round(b["train_prompts"]["reward"], 4),
                                     round(f.get("train_prompts", {}).get("reward", float("nan")), 4)],
            "score_vs_cpu_s": [(0.0, round(b["overall"], 4))] + [(p["cpu_s"], round(p["overall"], 4))
                                                                 for p in r["curve"]],
            "score_vs_wall_s": [(0.0, round(b["overall"], 4))] + [(p["wall_s"], round(p["overall"], 4))
                                                                  for p in r["curve"]],
            "epochs": r["epochs"], "images": r["images"],
        }
        if by_prompt:
            summary[name]["per_prompt_base"] = {k: round(v, 3) for k, v in b["per_prompt"].items()}
            summary[name]["per_prompt_trained"] = {k: round(v, 3) for k, v in f["per_prompt"].items()}
    result["summary"] = summary
    return json.loads(json.dumps(result, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def run(args: Any) -> dict[str, Any]:
    """``flowgrpo bench shapes`` entry point (``args``: the CLI namespace; missing attributes take defaults)."""
    variants = [v for v in str(getattr(args, "variants", "flowgrpo,fast_nocfg") or "").split(",") if v]
    if getattr(args, "guard", False) and "guard" not in variants:
        variants.append("guard")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown shapes bench variants {unknown}; known: {sorted(VARIANTS)}")
    model = getattr(args, "model", None)
    if not model or str(model).startswith("tiny"):  # the generic bench default is a random tiny model
        model = "shapes"
    import torch

    log = (lambda m: print(f"[bench shapes] {m}", flush=True, file=sys.stderr))
    threads = torch.get_num_threads()
    try:
        return _run(args, model, variants, log)
    finally:
        torch.set_num_threads(threads)  # --threads is for this run only


def _run(args: Any, model: str, variants: list[str], log: Any) -> dict[str, Any]:
    return run_shapes_bench(model=model, variants=variants,
                            cpu_budget_s=float(getattr(args, "cpu_budget_s", 600.0)),
                            eval_points=int(getattr(args, "eval_points", 3)),
                            n_per_tag=int(getattr(args, "n_per_tag", 16)),
                            n_seeds=int(getattr(args, "seeds", 2)),
                            overrides=list(getattr(args, "overrides", None) or []),
                            threads=getattr(args, "threads", None) or None, log=log,
                            out_dir=getattr(args, "out_dir", None),
                            eval_file=getattr(args, "eval_prompts", None) or None)


__all__ = ["VARIANTS", "diversity", "evaluate_adapter", "generate", "judge_image", "load_eval_prompts", "run",
           "run_shapes_bench", "summarize", "train_variant"]
