"""Building the benchmarked adapter, and the optional speed-ups the benchmarks can switch on.

Every option is read with ``getattr(args, name, default)``, so the CLI may or may not define it:

* ``threads`` (int, 0 = torch's default): ``torch.set_num_threads`` for the run (restored afterwards by
  :func:`flowgrpo.bench.run_bench`).
* ``compile`` (bool): ``torch.compile(transformer, dynamic=False)`` (inductor, CPU C++ codegen). The eager module
  stays available (FLOPs are counted on it, the diffusers baseline uses it); compile time is spent in the
  untimed warm-up and reported as ``compile_s``. Same math: fp32 throughout, only kernel fusion.
* ``malloc_tune`` (bool): glibc ``mallopt`` so big tensors are reused from the heap instead of being ``mmap``-ed
  and page-faulted in again on every allocation (~20k minor faults per transformer call on bench_cpu otherwise).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

import torch

MAX_SEQUENCE_LENGTH = 128
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def load_bench_adapter(args: Any, full_finetune: bool = False, needs_reference: bool = False):
    from flowgrpo.models import load_adapter

    threads = int(getattr(args, "threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    return load_adapter("sd3", args.model, device="cpu", mixed_precision="no",
                        max_sequence_length=int(getattr(args, "max_sequence_length", MAX_SEQUENCE_LENGTH)),
                        full_finetune=full_finetune, needs_reference=needs_reference)


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """glibc only: serve allocations below ``mmap_threshold`` from the heap and keep up to ``trim_threshold``
    bytes of free heap instead of returning it to the OS. Process-wide and permanent. Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):
        return False


def apply_speedups(adapter: Any, args: Any) -> dict[str, Any]:
    """Apply the optional speed-ups named by ``args`` to ``adapter`` (after any LoRA is attached).

    With ``compile``, ``adapter.transformer`` becomes the compiled module and ``adapter.eager_transformer`` holds
    the original. Returns what was applied (for the JSON line)."""
    applied: dict[str, Any] = {}
    if getattr(args, "malloc_tune", False):
        applied["malloc_tune"] = tune_malloc()
    adapter.eager_transformer = adapter.transformer
    if getattr(args, "compile", False):
        adapter.transformer = torch.compile(adapter.transformer, dynamic=False)
        applied["compile"] = True
    return applied


def eager(adapter: Any):
    """Context manager: ``adapter.transformer`` is the eager module inside (for FLOP counting)."""
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        current = adapter.transformer
        adapter.transformer = getattr(adapter, "eager_transformer", current)
        try:
            yield adapter.transformer
        finally:
            adapter.transformer = current

    return _ctx()


__all__ = ["MAX_SEQUENCE_LENGTH", "apply_speedups", "eager", "load_bench_adapter", "tune_malloc"]
