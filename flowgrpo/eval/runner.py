"""Evaluate models on suites: the same prompts, seeds and deterministic ODE sampler for every model, so a
trained model, its base and the current champion are compared image for image.

* Sampling: ``settings.num_steps`` Euler ODE steps (noise 0; 40 by default, the paper's evaluation), CFG
  ``settings.guidance_scale`` with the empty prompt as negative, batches of ``settings.batch_size`` images; image
  ``j`` of prompt ``i`` starts from the noise seeded ``seed_for(settings.seed, "eval", i, j)``, whatever the
  batch it lands in.
* Scoring runs in a worker thread while the next batch samples (``settings.overlap``); each scored batch is
  appended to ``results.jsonl`` (see :mod:`.results`) together with one thumbnail per image. ``settings.threads``
  sets torch's CPU threads for the duration (1 is much faster for the tiny CPU models on a busy machine).
* Resuming: :meth:`Evaluator.evaluate` on a directory that already holds results of the same model, suite and
  settings samples only the missing (prompt, image) pairs (a crash loses at most the batches in flight); other
  settings in that directory are an :class:`EvalStateError` unless ``restart=True`` wipes it.
* Caching: with a cache root, a finished evaluation is published under its key (:mod:`.cache`) and the next
  evaluation of the same model / suite / settings is read from there without loading the model.

:func:`run_eval` evaluates a candidate and optionally its base and a champion on several suites, applies the gate
(candidate - base on one metric) and writes ``report.html``, ``report.md`` and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flowgrpo.eval import cache as eval_cache
from flowgrpo.eval.results import (IMAGES_DIR, META_FILE, RESULTS_FILE, SKIPPED_FILE, ResultsLog, finite,
                                   image_name, latest, suite_metrics, verdict)
from flowgrpo.eval.suites import SUITES, Suite, SuiteError, build_suite

log = logging.getLogger("flowgrpo.eval")

ROLES = ("candidate", "base", "champion")


class EvalError(RuntimeError):
    """An evaluation cannot proceed (no usable reward, a required reward failed, ...)."""


class EvalStateError(EvalError):
    """An evaluation directory holds results of another model, suite or settings."""


@dataclass
class EvalSettings:
    num_steps: int = 40
    guidance_scale: float = 4.5
    resolution: int = 512
    batch_size: int = 8
    num_prompts: int = 0  # 0 = all
    images_per_prompt: int = 0  # 0 = the suite's default (GenEval 4, else 1)
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "no"
    max_sequence_length: int = 128
    #: longest side of the stored per-image thumbnails (JPEG); 0 = full-size PNG
    thumb_size: int = 256
    #: score batch b while batch b+1 samples
    overlap: bool = True
    #: torch intra-op threads while sampling and scoring (0 = leave torch's setting); 1 suits tiny CPU models,
    #: whose ops are too small to split and which OpenMP slows down badly on a busy machine
    threads: int = 0
    #: video families: frames per clip (0 = the model's default)
    num_frames: int = 0
    #: the training config's ``model.compile`` (same math, fused kernels) and ``malloc_tune`` (CPU only); neither
    #: changes the images beyond fp32 rounding, so neither is part of :meth:`fingerprint`
    compile: bool = False
    malloc_tune: bool = True

    @classmethod
    def from_config(cls, cfg: Any, **changes: Any) -> EvalSettings:
        e = cfg.eval
        s = cls(num_steps=e.num_steps, guidance_scale=e.guidance_scale, resolution=cfg.sample.resolution,
                batch_size=e.batch_size, num_prompts=e.num_prompts, seed=cfg.seed,
                device="cpu" if cfg.device == "cpu" else "auto", mixed_precision=cfg.model.mixed_precision,
                max_sequence_length=cfg.model.max_sequence_length, num_frames=cfg.model.num_frames,
                compile=cfg.model.compile, malloc_tune=cfg.malloc_tune)
        for k, v in changes.items():
            if v is not None:
                setattr(s, k, v)
        return s

    def device_type(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return str(self.device).split(":")[0]

    def fingerprint(self) -> dict[str, Any]:
        """The settings the images depend on (the prompt count and images per prompt are the suite's)."""
        return {"num_steps": self.num_steps, "guidance_scale": float(self.guidance_scale),
                "resolution": self.resolution, "batch_size": self.batch_size, "seed": self.seed,
                "mixed_precision": self.mixed_precision, "max_sequence_length": self.max_sequence_length,
                "device_type": self.device_type(), **({"num_frames": self.num_frames} if self.num_frames else {})}


@dataclass
class SuiteResult:
    suite: str
    metrics: dict[str, float]  # "<suite>/<name>" -> value (see flowgrpo.eval.results)
    records: list[dict[str, Any]]  # one per image, sorted by (prompt, image)
    root: Path | None  # local directory holding the records' thumbnails
    seconds: float  # wall time spent here (0 for a cache hit)
    role: str = "candidate"
    model: str = ""
    primary: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # reward -> why it was not used
    #: sampled / scored / resumed images, sample_s, score_s, cache ("hit" | "miss" | "off"), cache_uri
    stats: dict[str, Any] = field(default_factory=dict)

    def image_path(self, record: dict[str, Any]) -> Path | None:
        if self.root is None or not record.get("image"):
            return None
        p = self.root / record["image"]
        return p if p.is_file() else None


# ------------------------------------------------------------------------------------------------ sampler


class Sampler:
    """Deterministic ODE sampling with one loaded model. ``calls`` / ``images`` / ``seconds`` count its work."""

    def __init__(self, adapter: Any, settings: EvalSettings):
        from flowgrpo.edit import is_edit
        from flowgrpo.rollout import PromptEncoder

        self.adapter = adapter
        self.settings = settings
        self.edit = is_edit(adapter)  # edit models: each prompt row's source image is part of the conditioning
        self.encoder = PromptEncoder(adapter, settings.resolution)
        cfg = settings.guidance_scale > 1 and getattr(adapter, "needs_negative", True)
        self.negative = adapter.encode_prompts([""]) if cfg and not self.edit else None
        if hasattr(adapter, "resolution"):  # resolution-dependent schedules (FLUX's dynamic shift)
            adapter.resolution = settings.resolution
        if settings.num_frames:
            adapter.num_frames = settings.num_frames
        self.sigmas = adapter.sigmas(settings.num_steps)
        self.calls = 0
        self.images = 0
        self.seconds = 0.0

    @classmethod
    def load(cls, uri: str, settings: EvalSettings, family: str = "sd3", revision: str | None = None,
             cache_dir: Any = None) -> Sampler:
        from flowgrpo.models import load_adapter
        from flowgrpo.recipe import pick_device

        device = pick_device(settings.device)
        if device.type == "cpu" and settings.malloc_tune:
            from flowgrpo.runtime import tune_malloc

            tune_malloc()
        adapter = load_adapter(family, uri, revision=revision, device=str(device),
                               mixed_precision=settings.mixed_precision,
                               max_sequence_length=settings.max_sequence_length, needs_reference=False,
                               cache_dir=cache_dir)
        adapter.transformer.eval()
        if settings.compile:
            from flowgrpo.runtime import compile_module

            compile_module(adapter.transformer)
        return cls(adapter, settings)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int],
                 metadata: Sequence[dict] | None = None) -> np.ndarray:
        """uint8 [B, H, W, 3]: image b from ``prompts[b]`` (and, for edit models, the source image of
        ``metadata[b]``) with initial noise seeded ``seeds[b]``."""
        import torch

        from flowgrpo.rollout import rollout, to_uint8

        t0 = time.perf_counter()
        self.encoder.clear()
        with torch.no_grad():
            cond = self.encoder(prompts, metadata)  # each unique prompt (edit: prompt + source) once
            negative = self.negative
            if self.edit and self.settings.guidance_scale > 1 and getattr(self.adapter, "needs_negative", True):
                negative = self.encoder([""] * len(prompts), metadata)
            images, *_ = rollout(self.adapter, cond, negative, sigmas=self.sigmas, window=None,
                                 guidance_scale=self.settings.guidance_scale, noise_level=0.0, sde_type="sde",
                                 sample_seeds=[int(s) for s in seeds], resolution=self.settings.resolution)
            out = to_uint8(images)
        self.calls += 1
        self.images += len(out)
        self.seconds += time.perf_counter() - t0
        return out


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    from flowgrpo.distributed import seed_for

    return seed_for(seed, "eval", int(prompt_index), int(image_index))


# ------------------------------------------------------------------------------------------------ helpers


def _reason(e: BaseException, n: int = 400) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def encode_image(image: np.ndarray, thumb_size: int) -> tuple[bytes, str]:
    """(bytes, extension) of what is stored per image: a JPEG thumbnail (longest side ``thumb_size``), or the
    full-size PNG when ``thumb_size`` is 0. A video clip ([F, H, W, 3]) is stored as a looping GIF (8 fps) of its
    thumbnailed frames."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    if np.ndim(image) == 4:
        frames = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in image]
        for f in frames:
            if thumb_size and thumb_size > 0 and max(f.size) > thumb_size:
                f.thumbnail((thumb_size, thumb_size), Image.BICUBIC)
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=125, loop=0)
        return buf.getvalue(), "gif"
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if thumb_size and thumb_size > 0:
        if max(im.size) > thumb_size:
            im.thumbnail((thumb_size, thumb_size), Image.BICUBIC)
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "jpg"
    im.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _json_safe(obj: Any) -> Any:
    """Details as plain JSON (numpy scalars/arrays converted, non-finite floats -> None)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return finite(obj)
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads (0: unchanged), restoring the previous number after."""
    if not n or n <= 0:
        yield
        return
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _load_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


# ----------------------------------------------------------------------------------------------- evaluator


class Evaluator:
    """Evaluates models on suites with one set of :class:`EvalSettings`; holds the loaded model (one at a time)
    and the reward models (built once, shared by every model evaluated).

    ``cache_root``: where finished evaluations are published / looked up (:mod:`.cache`); None = the default
    root, ``""`` = no cache. ``sampler_factory(uri, revision) -> Sampler`` replaces model loading (tests)."""

    def __init__(self, settings: EvalSettings, family: str = "sd3", *, cache_root: str | None = None,
                 model_cache_dir: Any = None, sampler_factory: Callable[[str, str | None], Sampler] | None = None,
                 progress: bool | None = None):
        self.settings = settings
        self.family = family
        self.cache_root = eval_cache.default_cache_root() if cache_root is None else cache_root
        self.model_cache_dir = model_cache_dir
        self.sampler_factory = sampler_factory
        self.progress = progress
        self._sampler: tuple[tuple[str, str | None], Sampler] | None = None
        self._rewards: dict[str, Any] = {}
        self._used: set[str] = set()  # rewards that scored at least one batch (their failures are errors)
        self.skipped: dict[str, str] = {}  # reward -> reason (shared across models: every model, same rewards)
        self.samplers_loaded = 0

    # ------------------------------------------------------------------ model
    def sampler(self, uri: str, revision: str | None = None) -> Sampler:
        key = (str(uri), revision)
        if self._sampler is not None and self._sampler[0] == key:
            return self._sampler[1]
        self.release()
        t0 = time.perf_counter()
        if self.sampler_factory is not None:
            s = self.sampler_factory(uri, revision)
        else:
            s = Sampler.load(uri, self.settings, self.family, revision, self.model_cache_dir)
        self.samplers_loaded += 1
        log.info("loaded %s in %.1fs", uri, time.perf_counter() - t0)
        self._sampler = (key, s)
        return s

    def release(self) -> None:
        """Drop the loaded model (and free its accelerator memory)."""
        if self._sampler is None:
            return
        self._sampler = None
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    # ---------------------------------------------------------------- rewards
    def _reward_key(self, suite: Suite, name: str) -> str:
        opts = json.dumps(suite.reward_options.get(name, {}), sort_keys=True, default=repr)
        fac = suite.factories.get(name)
        return f"{name}|{opts}|{id(fac) if fac is not None else ''}"

    def rewards_for(self, suite: Suite, skipped: dict[str, str]) -> dict[str, Any]:
        """name -> reward object for the suite's rewards that are usable; optional ones that cannot be built
        go to ``skipped`` (required ones raise)."""
        from flowgrpo.rewards import build_reward

        out = {}
        for name in suite.rewards:
            if name in skipped:
                continue
            if name in self.skipped and name in suite.optional:
                skipped[name] = self.skipped[name]
                continue
            key = self._reward_key(suite, name)
            if key not in self._rewards:
                try:
                    fac = suite.factories.get(name)
                    self._rewards[key] = fac() if fac is not None else build_reward(
                        name, **suite.reward_options.get(name, {}))
                except Exception as e:  # noqa: BLE001 - reported per reward
                    if name not in suite.optional:
                        raise EvalError(f"suite {suite.name!r}: reward {name!r} cannot be built: {_reason(e)}") from e
                    skipped[name] = self.skipped[name] = _reason(e)
                    log.warning("suite %s: skipping reward %s: %s", suite.name, name, skipped[name])
                    continue
            out[name] = self._rewards[key]
        if not out:
            raise EvalError(f"suite {suite.name!r}: none of its rewards {sorted(suite.rewards)} is available: "
                            + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        return out

    # -------------------------------------------------------------- evaluate
    def evaluate(self, uri: str, suite: Suite, work_dir: str | os.PathLike, *, role: str = "candidate",
                 revision: str | None = None, restart: bool = False, use_cache: bool = True) -> SuiteResult:
        """``suite`` on the model at ``uri``: from the cache when it holds this evaluation, else sampled and
        scored in ``work_dir`` (resuming what is there), then published to the cache."""
        t0 = time.perf_counter()
        identity = eval_cache.model_identity(uri, revision)
        key = None
        if use_cache and self.cache_root:
            key = eval_cache.cache_key(identity, suite.fingerprint(), self.settings.fingerprint())
            if key is None:
                log.info("%s %s: not cached (%s)", role, uri, identity.get("why", "not cacheable"))
            else:
                hit = eval_cache.lookup(self.cache_root, suite.name, key)
                if hit is not None:
                    local = eval_cache.materialize(hit, Path(work_dir).with_name(Path(work_dir).name + "-cached"))
                    res = self._load_result(local, uri, suite, role)
                    res.stats.update(cache="hit", cache_uri=hit, sampled=0, scored=0, resumed=len(res.records))
                    res.seconds = time.perf_counter() - t0
                    log.info("%s %s on %s: cache hit %s (no sampling)", role, uri, suite.name, hit)
                    return res
        res = self._run(uri, suite, Path(work_dir), identity, role=role, revision=revision, restart=restart)
        res.stats["cache"] = "off" if key is None else "miss"
        if key is not None:
            published = eval_cache.publish(work_dir, self.cache_root, suite.name, key)
            if published:
                res.stats["cache_uri"] = published
        res.seconds = time.perf_counter() - t0
        return res

    def _load_result(self, root: Path, uri: str, suite: Suite, role: str) -> SuiteResult:
        n, k = len(suite.prompts), suite.images_per_prompt
        records = sorted((r for (pi, ii), r in latest(ResultsLog(root / RESULTS_FILE).load(repair=False)).items()
                          if pi < n and ii < k), key=lambda r: (r["prompt_index"], r["image_index"]))
        skipped = _load_json(root / SKIPPED_FILE, {})
        return SuiteResult(suite.name, suite_metrics(suite.name, records), records, root, 0.0, role=role,
                           model=uri, primary=suite.primary, skipped=skipped, stats={})

    def _check_state(self, work: Path, meta: dict[str, Any], restart: bool) -> None:
        old = _load_json(work / META_FILE, None)
        if old is None:
            return
        keys = ("model", "settings", "suite_name", "rewards", "reward_options")
        diff = [k for k in keys if old.get(k) != meta.get(k)]
        if not diff:
            return
        if restart:
            log.warning("%s: results of other %s; starting over (restart)", work, ", ".join(diff))
            for name in (RESULTS_FILE, SKIPPED_FILE, META_FILE):
                (work / name).unlink(missing_ok=True)
            shutil.rmtree(work / IMAGES_DIR, ignore_errors=True)
            return
        raise EvalStateError(f"{work} holds results of another evaluation (different {', '.join(diff)}); use "
                             "another output directory or restart=True (--restart) to discard them")

    def _run(self, uri: str, suite: Suite, work: Path, identity: dict[str, Any], *, role: str,
             revision: str | None, restart: bool) -> SuiteResult:
        t_start = time.perf_counter()
        s = self.settings
        work.mkdir(parents=True, exist_ok=True)
        meta = {"model": identity, "settings": s.fingerprint(), "suite_name": suite.name,
                "rewards": dict(sorted(suite.rewards.items())),
                "reward_options": json.loads(json.dumps(suite.reward_options, sort_keys=True, default=str)),
                "suite": suite.fingerprint(), "role": role, "uri": str(uri), "revision": revision,
                "source": suite.source}
        self._check_state(work, meta, restart)
        _write_atomic(work / META_FILE, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
        results = ResultsLog(work / RESULTS_FILE)
        done = latest(results.load())
        n, k = len(suite.prompts), suite.images_per_prompt
        for (pi, _), rec in done.items():
            if pi < n and rec.get("prompt") != suite.prompts.prompts[pi]:
                raise EvalStateError(f"{work}: prompt {pi} of the stored results ({rec.get('prompt')!r}) is not the "
                                     f"suite's ({suite.prompts.prompts[pi]!r}); use --restart or another directory")
        todo = [(pi, ii) for pi in range(n) for ii in range(k) if (pi, ii) not in done]
        resumed = n * k - len(todo)
        skipped: dict[str, str] = _load_json(work / SKIPPED_FILE, {})
        stats: dict[str, Any] = {"sampled": 0, "scored": 0, "resumed": resumed, "sample_s": 0.0, "score_s": 0.0,
                                 "batches": 0}
        if resumed and todo:
            log.info("resuming %s %s on %s: %d of %d images already scored in %s, sampling the other %d", role, uri,
                     suite.name, resumed, n * k, work, len(todo))
        elif not todo:
            log.info("%s %s on %s: all %d images already scored in %s", role, uri, suite.name, n * k, work)
        if todo:
            rewards = self.rewards_for(suite, skipped)
            if skipped:
                _write_atomic(work / SKIPPED_FILE, json.dumps(skipped, indent=1, sort_keys=True).encode())
            with _torch_threads(s.threads):
                sampler = self.sampler(uri, revision)
                new = self._sample_and_score(sampler, suite, rewards, skipped, todo, work, results, stats)
            done.update(new)
        records = [done[(pi, ii)] for pi in range(n) for ii in range(k) if (pi, ii) in done]
        metrics = suite_metrics(suite.name, records)
        return SuiteResult(suite.name, metrics, records, work, time.perf_counter() - t_start, role=role,
                           model=str(uri), primary=suite.primary, skipped=dict(skipped), stats=stats)

    def _score(self, suite: Suite, rewards: dict[str, Any], skipped: dict[str, str], work: Path,
               images: np.ndarray, prompts: list[str], meta: list[dict]) -> tuple[dict, dict]:
        """name -> scores [B] and name -> details [B] of the usable rewards; an optional reward failing on its
        first call here is skipped (reason recorded), any later failure raises."""
        from flowgrpo.rewards.base import RewardOutput
        from flowgrpo.rewards.video import frames_as_images, is_video, mean_per_clip

        scores: dict[str, np.ndarray] = {}
        details: dict[str, list[dict]] = {}
        for name, reward in list(rewards.items()):
            try:
                if is_video(images):  # clips: every frame scored as an image, the mean per clip
                    frames, f_prompts, f_meta, n_frames = frames_as_images(images, prompts, meta)
                    out = reward(frames, f_prompts, f_meta)
                    out = RewardOutput(mean_per_clip(out.scores, n_frames), [{} for _ in range(len(images))])
                else:
                    out = reward(images, prompts, meta)
                sc = np.asarray(out.scores, dtype=np.float64).reshape(-1)
                if sc.shape != (len(images),):
                    raise ValueError(f"returned {sc.shape[0]} scores for {len(images)} images")
            except Exception as e:  # noqa: BLE001
                if name in suite.optional and name not in self._used:
                    skipped[name] = self.skipped[name] = _reason(e)
                    rewards.pop(name)
                    log.warning("suite %s: skipping reward %s (failed on its first call): %s", suite.name, name,
                                skipped[name])
                    _write_atomic(work / SKIPPED_FILE, json.dumps(skipped, indent=1, sort_keys=True).encode())
                    continue
                raise EvalError(f"suite {suite.name!r}: reward {name!r} failed: {_reason(e)}") from e
            self._used.add(name)
            scores[name] = sc
            det = list(out.details or [])
            details[name] = det if len(det) == len(images) else [{} for _ in range(len(images))]
        if not scores:
            raise EvalError(f"suite {suite.name!r}: every reward failed: "
                            + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        return scores, details

    def _sample_and_score(self, sampler: Sampler, suite: Suite, rewards: dict[str, Any], skipped: dict[str, str],
                          todo: list[tuple[int, int]], work: Path, results: ResultsLog,
                          stats: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
        s = self.settings
        bs = max(1, int(s.batch_size))
        batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
        new: dict[tuple[int, int], dict[str, Any]] = {}
        lock = threading.Lock()

        def score_batch(pairs: list[tuple[int, int]], images: np.ndarray, seeds: list[int]) -> None:
            t0 = time.perf_counter()
            prompts = [suite.prompts.prompts[pi] for pi, _ in pairs]
            meta = [suite.prompts.metadata[pi] for pi, _ in pairs]
            scores, details = self._score(suite, rewards, skipped, work, images, prompts, meta)
            recs = []
            for b, (pi, ii) in enumerate(pairs):
                data, ext = encode_image(images[b], s.thumb_size)
                rel = image_name(pi, ii, ext)
                _write_atomic(work / rel, data)
                sc = {name: finite(v[b]) for name, v in scores.items()}
                det = {name: _json_safe(d[b]) for name, d in details.items() if d[b]}
                total = sum(suite.rewards[name] * v[b] for name, v in scores.items() if suite.rewards[name])
                weighted = any(suite.rewards[name] for name in scores)
                passed, strict = verdict(sc, det)
                recs.append({"prompt_index": pi, "image_index": ii, "seed": seeds[b], "prompt": prompts[b],
                             "category": str(meta[b].get("tag") or "all"), "scores": sc,
                             "avg": finite(total) if weighted else None, "passed": passed, "strict_passed": strict,
                             "details": det, "image": rel, "time": round(time.time(), 3)})
            results.append(recs)
            with lock:
                for r in recs:
                    new[(r["prompt_index"], r["image_index"])] = r
                stats["scored"] += len(recs)
                stats["score_s"] += time.perf_counter() - t0
                if bar is not None:
                    bar.update(len(recs))

        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"eval {suite.name}", leave=False,
                       disable=(None if self.progress is None else not self.progress))
        except ImportError:  # pragma: no cover
            bar = None
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-score") if s.overlap else None
        pending = None
        try:
            for pairs in batches:
                seeds = [image_seed(s.seed, pi, ii) for pi, ii in pairs]
                t0 = time.perf_counter()
                images = sampler([suite.prompts.prompts[pi] for pi, _ in pairs], seeds,
                                 [suite.prompts.metadata[pi] for pi, _ in pairs])
                stats["sample_s"] += time.perf_counter() - t0
                stats["sampled"] += len(pairs)
                stats["batches"] += 1
                if pending is not None:
                    pending.result()  # the previous batch is scored (its error is raised here)
                if pool is None:
                    score_batch(pairs, images, seeds)
                else:
                    pending = pool.submit(score_batch, pairs, images, seeds)
            if pending is not None:
                pending.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True)  # a batch being scored still reaches results.jsonl
            if bar is not None:
                bar.close()
        return new


# --------------------------------------------------------------------------------------------- whole runs


@dataclass
class EvalRun:
    """Everything :func:`run_eval` produced."""

    suites: list[str]
    results: dict[str, list[SuiteResult]]  # role -> one result per suite
    metrics: dict[str, dict[str, float]]  # role -> flat metrics
    gate_metric: str
    gate: str
    passed: bool | None
    delta: float | None
    markdown: str
    html: str
    out_dir: Path
    seconds: float
    models: dict[str, str] = field(default_factory=dict)  # role -> URI

    @property
    def candidate(self) -> dict[str, float]:
        return self.metrics.get("candidate", {})

    @property
    def base(self) -> dict[str, float]:
        return self.metrics.get("base", {})

    @property
    def champion(self) -> dict[str, float]:
        return self.metrics.get("champion", {})

    def skipped(self) -> dict[str, dict[str, str]]:
        return {r.suite: r.skipped for r in self.results.get("candidate", []) if r.skipped}

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (what ``metrics.json`` holds)."""
        return {"suites": self.suites, "models": self.models, "metrics": self.metrics,
                "gate": {"metric": self.gate_metric, "text": self.gate, "passed": self.passed, "delta": self.delta},
                "skipped": self.skipped(), "seconds": round(self.seconds, 3),
                "runs": {role: {r.suite: {"seconds": round(r.seconds, 3), **{k: (round(v, 4) if isinstance(v, float)
                                                                                   else v)
                                                                             for k, v in r.stats.items()}}
                                for r in rs} for role, rs in self.results.items()}}


def flat_metrics(results: Sequence[SuiteResult]) -> dict[str, float]:
    return {k: v for r in results for k, v in r.metrics.items()}


def apply_gate(candidate: dict[str, float], base: dict[str, float] | None, metric: str,
               min_improvement: float) -> tuple[bool | None, float | None, str]:
    """(passed, delta, text) of the gate candidate[metric] - base[metric] >= min_improvement; without a base
    (or without the metric in it) the gate is not evaluated (passed None)."""
    if metric not in candidate:
        raise ValueError(f"gate_metric={metric!r} is not among the evaluation metrics {sorted(candidate)}")
    if not base or metric not in base:
        return None, None, f"{metric}: no base model result, gate not evaluated"
    delta = candidate[metric] - base[metric]
    passed = math.isfinite(delta) and delta >= min_improvement
    return passed, delta, f"{metric}: candidate − base = {delta:+.5g} ≥ {min_improvement:g}"


def run_eval(model: str, suites: Sequence[Suite], settings: EvalSettings, out_dir: str | os.PathLike, *,
             base: str | None = None, champion: str | None = None, family: str = "sd3",
             revision: str | None = None, base_revision: str | None = None, champion_revision: str | None = None,
             cache_dir: str | None = None, cache_candidate: bool = True, gate_metric: str = "",
             gate_min_improvement: float = 0.0, restart: bool = False, title: str = "Flow-GRPO evaluation",
             evaluator: Evaluator | None = None, report_options: dict[str, Any] | None = None) -> EvalRun:
    """Evaluate ``model`` (and ``base`` / ``champion`` when given) on ``suites`` in ``out_dir``
    (``<role>/<suite>/``: resumable), apply the gate, write ``report.html``, ``report.md`` and ``metrics.json``.
    ``cache_dir``: the cache root (None = default, "" = no cache); base and champion are always looked up
    there, the candidate when ``cache_candidate``."""
    from flowgrpo.eval import report as rep

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = evaluator or Evaluator(settings, family, cache_root=cache_dir)
    models = {"candidate": (model, revision)}
    if base:
        models["base"] = (base, base_revision)
    if champion:
        models["champion"] = (champion, champion_revision)
    results: dict[str, list[SuiteResult]] = {}
    try:
        for role, (uri, rev) in models.items():
            results[role] = [ev.evaluate(uri, suite, out / role / suite.name, role=role, revision=rev,
                                         restart=restart, use_cache=(role != "candidate" or cache_candidate))
                             for suite in suites]
            ev.release()
    finally:
        ev.release()
    metrics = {role: flat_metrics(rs) for role, rs in results.items()}
    metric = gate_metric or (suites[0].primary if suites else "")
    passed, delta, gate = apply_gate(metrics["candidate"], metrics.get("base"), metric, gate_min_improvement)
    uris = {role: str(uri) for role, (uri, _) in models.items()}
    md = rep.markdown_report(metrics["candidate"], metrics.get("base", {}), gate=gate, passed=passed,
                             champion=metrics.get("champion"), title=title, gate_metric=metric,
                             skipped={r.suite: r.skipped for r in results["candidate"] if r.skipped})
    page = rep.html_report(results["candidate"], results.get("base", []), gate=gate, passed=passed,
                           champion=results.get("champion"), title=title, gate_metric=metric, models=uris,
                           settings=settings, **(report_options or {}))
    run = EvalRun(suites=[s.name for s in suites], results=results, metrics=metrics, gate_metric=metric, gate=gate,
                  passed=passed, delta=delta, markdown=md, html=page, out_dir=out,
                  seconds=time.perf_counter() - t0, models=uris)
    _write_atomic(out / "report.html", page.encode())
    _write_atomic(out / "report.md", md.encode())
    _write_atomic(out / "metrics.json", (json.dumps(run.summary(), indent=1, sort_keys=True, default=str) + "\n")
                  .encode())
    return run


def evaluate_model(model_path: str, suites: Sequence[Suite], settings: EvalSettings, family: str = "sd3",
                   out_dir: str | os.PathLike | None = None, cache_dir: str | None = "") -> list[SuiteResult]:
    """``suites`` on one model (no base, no report); ``out_dir`` None = a temporary directory."""
    import tempfile

    ev = Evaluator(settings, family, cache_root=cache_dir)
    root = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="flowgrpo-eval-"))
    try:
        return [ev.evaluate(model_path, s, root / s.name) for s in suites]
    finally:
        ev.release()


__all__ = ["EvalError", "EvalRun", "EvalSettings", "EvalStateError", "Evaluator", "ROLES", "SUITES", "Sampler",
           "Suite", "SuiteError", "SuiteResult", "apply_gate", "build_suite", "encode_image", "evaluate_model",
           "flat_metrics", "image_seed", "run_eval"]
