"""Prompt sets: a ``.txt`` file (one prompt per line), a ``.jsonl`` file (one JSON object per line with a
``prompt`` key; the whole object is the prompt's metadata, e.g. GenEval's ``include`` clauses), or a
built-in generated set (``builtin:<name>``) for offline development."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.metadata:
            self.metadata = [{} for _ in self.prompts]
        if len(self.metadata) != len(self.prompts):
            raise ValueError("prompts and metadata differ in length")

    def __len__(self) -> int:
        return len(self.prompts)


_ANIMALS = ["cat", "dog", "horse", "rabbit", "fox", "owl", "turtle", "frog", "bear", "duck", "tiger", "whale"]
_HELD_OUT_ANIMALS = ["zebra", "panda", "goat", "lion"]
_STYLES = ["a photo of a {}", "a drawing of a {}", "a {} in the snow", "a {} on the beach"]


def _builtin(name: str) -> PromptSet:
    if name == "animals":  # DDPO-style simple prompts: 48 prompts
        return PromptSet([s.format(a) for s, a in itertools.product(_STYLES, _ANIMALS)])
    if name == "animals_test":  # held out: animals never seen in training, 16 prompts
        return PromptSet([s.format(a) for s, a in itertools.product(_STYLES, _HELD_OUT_ANIMALS)])
    if name in ("shapes_train", "shapes_test"):  # the shapes world's tag-balanced GenEval rows (flowgrpo.eval.shapes)
        from flowgrpo.eval.shapes import builtin_prompt_set

        return builtin_prompt_set(name[len("shapes_"):])
    if name in ("shapes_edit_train", "shapes_edit_test"):  # counting edits of rendered scenes (flowgrpo.eval.shapes_edit)
        from flowgrpo.eval.shapes_edit import builtin_edit_set

        return builtin_edit_set(name[len("shapes_edit_"):])
    raise ValueError(f"unknown built-in prompt set {name!r}; available: ['animals', 'animals_test', 'shapes_train', "
                     "'shapes_test', 'shapes_edit_train', 'shapes_edit_test']")


def load_prompts(spec: str) -> PromptSet:
    """``builtin:<name>``, or a .txt / .jsonl file: a local path or a storage URI (``s3://bucket/key``, read with
    :mod:`flowgrpo.storage`: a trainer pod reads its prompts from the same bucket as its model)."""
    if spec.startswith("builtin:"):
        return _builtin(spec.split(":", 1)[1])
    from flowgrpo import storage

    if storage.is_s3(spec):
        try:
            text = storage.read_text(spec)
        except FileNotFoundError:
            raise FileNotFoundError(f"prompt file {spec!r} does not exist (data.train_prompts / data.test_prompts)"
                                    ) from None
        suffix = Path(spec.rsplit("/", 1)[-1]).suffix
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {spec!r} does not exist (data.train_prompts / data.test_prompts)")
        text, suffix = path.read_text(encoding="utf-8"), path.suffix
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if suffix == ".jsonl":
        rows = [json.loads(ln) for ln in lines]
        missing = [i for i, r in enumerate(rows) if "prompt" not in r]
        if missing:
            raise ValueError(f"{spec}: line {missing[0] + 1} has no 'prompt' key")
        return PromptSet([r["prompt"] for r in rows], rows)
    return PromptSet(lines)
