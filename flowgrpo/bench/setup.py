"""Building the benchmarked adapter, and the speed settings the benchmarks share with the recipe (flowgrpo.runtime).

Every option is read with ``getattr(args, name, default)``, so the CLI may or may not define it:

* ``threads`` (int, 0 = torch's default): ``torch.set_num_threads`` for the run (restored afterwards by
  :func:`flowgrpo.bench.run_bench`).
* ``compile`` (bool): the recipe's ``model.compile=true``: the transformer compiled in place
  (:func:`flowgrpo.runtime.compile_module`). FLOPs are counted and the diffusers baseline runs inside
  :func:`eager`; compile time is spent in the untimed warm-up and reported as ``compile_s``. Same fp32 math, only
  kernel fusion.
* ``malloc_tune`` (bool, default True like the recipe's ``malloc_tune`` on CPU; ``--no-malloc-tune`` turns it off):
  :func:`flowgrpo.runtime.tune_malloc`. Process-wide: the diffusers baseline of the same run gets it too.
"""

from __future__ import annotations

from typing import Any

import torch

from flowgrpo.runtime import compile_module, force_eager, tune_malloc

MAX_SEQUENCE_LENGTH = 128


def load_bench_adapter(args: Any, full_finetune: bool = False, needs_reference: bool = False):
    from flowgrpo.models import load_adapter

    threads = int(getattr(args, "threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return load_adapter("sd3", args.model, device="cpu", mixed_precision="no",
                        max_sequence_length=int(getattr(args, "max_sequence_length", MAX_SEQUENCE_LENGTH)),
                        full_finetune=full_finetune, needs_reference=needs_reference)


def apply_speedups(adapter: Any, args: Any) -> dict[str, Any]:
    """Apply the speed settings named by ``args`` to ``adapter`` (after any LoRA is attached), exactly as the recipe
    does for ``malloc_tune`` / ``model.compile``. Returns what was applied (for the JSON line)."""
    applied: dict[str, Any] = {}
    if getattr(args, "malloc_tune", True):
        applied["malloc_tune"] = tune_malloc()
    if getattr(args, "compile", False):
        compile_module(adapter.transformer)
        applied["compile"] = True
    return applied


def eager(adapter: Any):
    """Context manager: the (possibly compiled) transformer runs its eager code inside (FLOP counting, call hooks,
    the diffusers baseline). Yields ``adapter.transformer``."""
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        with force_eager():
            yield adapter.transformer

    return _ctx()


__all__ = ["MAX_SEQUENCE_LENGTH", "apply_speedups", "eager", "load_bench_adapter"]
