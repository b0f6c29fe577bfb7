"""Evaluation suites: which prompts, how many images per prompt, which rewards score them and which metric
sums a suite up.

==========  ===========================================  ====================================  ==================
suite       prompts                                      rewards                               primary metric
==========  ===========================================  ====================================  ==================
preset      the preset's ``data.test_prompts`` (else     the preset's rewards (reward-server   ``preset/avg``
            ``train_prompts``)                           URLs dropped: scored in-process)
geneval     ``<data_root>/geneval/test_metadata.jsonl``  ``geneval`` (rules + detector)        ``geneval/overall``
            (553 unique prompts, 4 images each)
drawbench   ``<data_root>/drawbench/test.txt``           PickScore (weight 1), ImageReward,    ``drawbench/avg``
            (200 unique prompts)                         Aesthetic, CLIPScore, UnifiedReward,
                                                         DeQA (weight 0: reported, optional)
ocr         ``<data_root>/ocr/test.txt``                 ``ocr``                               ``ocr/avg``
pickscore   ``<data_root>/pickscore_sfw/test.txt``       ``pickscore``                         ``pickscore/avg``
shapes      :func:`flowgrpo.eval.shapes.prompt_set`      ``shapes``                            ``shapes/overall``
            (``split="test"``)
==========  ===========================================  ====================================  ==================

Prompt files are de-duplicated (first occurrence kept, in file order): the upstream GenEval test file lists each
of its 553 prompts four times and DrawBench's lists its 200 prompts ~5 times; an evaluation draws
``images_per_prompt`` images per unique prompt instead (GenEval's protocol: 4).

Optional rewards (DrawBench's quality models) that cannot be built here (not installed, no endpoint) are
*skipped* with the reason instead of failing the evaluation; required rewards fail it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flowgrpo.prompts import PromptSet, load_prompts

SUITES = ("preset", "geneval", "drawbench", "ocr", "pickscore", "shapes")

#: suite -> prompt file under the data root
DATA_FILES = {
    "geneval": "geneval/test_metadata.jsonl",
    "drawbench": "drawbench/test.txt",
    "ocr": "ocr/test.txt",
    "pickscore": "pickscore_sfw/test.txt",
}
#: DrawBench's reward models, in report order (PickScore carries the suite's ``avg``)
DRAWBENCH_REWARDS = ("pickscore", "imagereward", "aesthetic", "clipscore", "unifiedreward", "deqa")
#: images per prompt when the settings leave it at 0
DEFAULT_IMAGES_PER_PROMPT = {"geneval": 4, "shapes": 4}
#: prompts of the generated ``shapes`` suite when the settings leave ``num_prompts`` at 0
SHAPES_DEFAULT_PROMPTS = 120
#: environment variable naming the default data root (a directory with the suites' prompt files)
DATA_ROOT_ENV = "FLOWGRPO_EVAL_DATA"


class SuiteError(ValueError):
    """A suite cannot be built (unknown name, missing prompt file or module)."""


@dataclass
class Suite:
    name: str
    prompts: PromptSet
    #: reward name -> weight of the suite's ``avg`` (0 = reported only)
    rewards: dict[str, float]
    #: reward name -> constructor options
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: rewards that may be skipped (with the reason) when they cannot be built or called here
    optional: frozenset[str] = frozenset()
    #: reward name -> a factory used instead of ``build_reward(name, **options)``
    factories: dict[str, Callable[[], Any]] = field(default_factory=dict)
    images_per_prompt: int = 1
    #: the metric that sums the suite up (the default gate metric)
    primary: str = ""
    #: where the prompts came from (a file path, ``builtin:...``, ``shapes:test``)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.primary:
            self.primary = f"{self.name}/avg"

    def prompt_digest(self) -> str:
        """sha256 of the prompts and their metadata (identifies the prompt list in caches and resume checks)."""
        h = hashlib.sha256()
        for p, m in zip(self.prompts.prompts, self.prompts.metadata):
            h.update(json.dumps([p, m], sort_keys=True, default=str).encode())
            h.update(b"\n")
        return h.hexdigest()

    def fingerprint(self) -> dict[str, Any]:
        """What the suite's numbers depend on (besides the model and the sampling settings)."""
        return {"name": self.name, "prompts": self.prompt_digest(), "n_prompts": len(self.prompts),
                "images_per_prompt": self.images_per_prompt, "rewards": dict(sorted(self.rewards.items())),
                "reward_options": json.loads(json.dumps(self.reward_options, sort_keys=True, default=str)),
                "factories": sorted(self.factories)}


def dedupe(ps: PromptSet) -> PromptSet:
    """The first occurrence of every prompt, in order (metadata of that occurrence); edit rows count as the same
    only with the same source image."""
    seen: set[tuple[str, str]] = set()
    prompts, meta = [], []
    for p, m in zip(ps.prompts, ps.metadata):
        key = (p, str(m.get("image", "")))
        if key not in seen:
            seen.add(key)
            prompts.append(p)
            meta.append(m)
    return PromptSet(prompts, meta)


def head(ps: PromptSet, n: int) -> PromptSet:
    """The first ``n`` prompts (all when ``n`` is 0)."""
    if not n or n >= len(ps):
        return ps
    return PromptSet(ps.prompts[:n], ps.metadata[:n])


def resolve_data_root(data_root: str | os.PathLike | None) -> Path | None:
    root = data_root or os.environ.get(DATA_ROOT_ENV) or None
    return Path(root).expanduser() if root else None


def _prompt_file(name: str, data_root: str | os.PathLike | None) -> Path:
    root = resolve_data_root(data_root)
    if root is None:
        raise SuiteError(f"eval suite {name!r} needs a data root (--data-root / eval_data_root / ${DATA_ROOT_ENV}): "
                         f"a directory holding {DATA_FILES[name]}")
    path = root / DATA_FILES[name]
    if not path.is_file():
        raise SuiteError(f"eval suite {name!r}: prompt file {path} not found (the data root must hold "
                         f"{DATA_FILES[name]})")
    return path


def _shapes_module():
    import importlib

    try:
        return importlib.import_module("flowgrpo.eval.shapes")
    except ModuleNotFoundError as e:
        if e.name != "flowgrpo.eval.shapes":
            raise
        raise SuiteError("eval suite 'shapes' needs the module flowgrpo.eval.shapes (the synthetic shapes "
                         "benchmark), which is not part of this build") from None


def _shapes_reward_factory(shapes: Any) -> Callable[[], Any] | None:
    """The ``shapes`` reward: the registered one if the registry has it, else the GenEval rules on the shapes
    module's rule-based detector (colours come with its detections)."""
    from flowgrpo.rewards import REGISTRY

    try:
        if "shapes" in REGISTRY:
            return None
    except ImportError:  # the registry names a provider module this build does not have yet
        pass
    detector_cls = getattr(shapes, "ShapesDetector", None)
    if detector_cls is None:
        raise SuiteError("eval suite 'shapes': no 'shapes' reward is registered and flowgrpo.eval.shapes has no "
                         "ShapesDetector to judge the images with")

    def build() -> Any:
        from flowgrpo.rewards.geneval import GenEvalReward

        reward = GenEvalReward(detector=detector_cls(), lazy_color=True)
        reward.name = "shapes"
        return reward

    return build


def build_suite(name: str, cfg: Any = None, data_root: str | os.PathLike | None = None, *,
                num_prompts: int = 0, images_per_prompt: int = 0, seed: int = 0,
                reward_options: dict[str, dict[str, Any]] | None = None,
                drawbench_rewards: tuple[str, ...] | list[str] | None = None) -> Suite:
    """The suite ``name`` (module docstring), its prompt list cut to the first ``num_prompts`` (0 = all).

    ``cfg``: the run's :class:`~flowgrpo.config.RunConfig` (needed by ``preset``; its ``reward_options`` are the
    defaults of every suite's rewards, reward-server URLs dropped); ``reward_options``: {reward: options}
    overriding those (e.g. local model directories); ``images_per_prompt``: 0 = the suite's default
    (GenEval/shapes 4, else 1); ``seed``: the ``shapes`` prompt draw."""
    if name not in SUITES:
        raise SuiteError(f"unknown eval suite {name!r}; known suites: {list(SUITES)}")
    opts: dict[str, dict[str, Any]] = {}
    if cfg is not None:
        opts = {k: {o: v for o, v in d.items() if o != "url"} for k, d in cfg.reward_options.items()}
    for k, v in (reward_options or {}).items():
        opts[k] = {**opts.get(k, {}), **dict(v)}
    k_default = DEFAULT_IMAGES_PER_PROMPT.get(name, 1)
    k = int(images_per_prompt) or k_default
    if k < 1:
        raise SuiteError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    factories: dict[str, Callable[[], Any]] = {}
    optional: frozenset[str] = frozenset()
    primary = ""
    if name == "preset":
        if cfg is None:
            raise SuiteError("eval suite 'preset' needs the run config (--preset)")
        from flowgrpo.edit import is_edit, load_prompt_set
        from flowgrpo.models.loading import ADAPTERS

        spec = cfg.data.test_prompts or cfg.data.train_prompts
        edit = is_edit(ADAPTERS.get(cfg.model.family))  # edit rows: source paths resolved (data.image_root)
        prompts, source = dedupe(load_prompt_set(spec, cfg.data.image_root, edit)), spec
        rewards = dict(cfg.reward)
    elif name == "shapes":
        shapes = _shapes_module()
        n = int(num_prompts) or SHAPES_DEFAULT_PROMPTS
        prompts, source = shapes.prompt_set(n, seed, "test"), "shapes:test"  # repeats only past the pool size
        rewards = {"shapes": 1.0}
        factory = _shapes_reward_factory(shapes)
        if factory is not None:
            factories["shapes"] = factory
        primary = "shapes/overall"
    else:
        path = _prompt_file(name, data_root)
        prompts, source = dedupe(load_prompts(str(path))), str(path)
        if name == "geneval":
            rewards, primary = {"geneval": 1.0}, "geneval/overall"
        elif name == "drawbench":
            names = list(drawbench_rewards or DRAWBENCH_REWARDS)
            rewards = {r: (1.0 if r == "pickscore" else 0.0) for r in names}
            optional = frozenset(names)  # all skippable; the runner fails only when none is available
        elif name == "ocr":
            rewards = {"ocr": 1.0}
        else:  # pickscore
            rewards = {"pickscore": 1.0}
    prompts = head(prompts, int(num_prompts))
    return Suite(name=name, prompts=prompts, rewards=rewards,
                 reward_options={r: o for r, o in opts.items() if r in rewards and o}, optional=optional,
                 factories=factories, images_per_prompt=k, primary=primary, source=source)


__all__ = ["DATA_FILES", "DATA_ROOT_ENV", "DEFAULT_IMAGES_PER_PROMPT", "DRAWBENCH_REWARDS", "SUITES",
           "SHAPES_DEFAULT_PROMPTS", "Suite", "SuiteError", "build_suite", "dedupe", "head", "resolve_data_root"]
