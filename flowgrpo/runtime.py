"""Process-level speed settings shared by the recipe, the evaluation runner and the benchmarks.

* :func:`tune_malloc` (glibc, CPU runs): big activations are reused from the heap instead of being ``mmap``-ed and
  page-faulted in again on every allocation. On ``bench_cpu`` a CFG transformer call otherwise takes ~20k minor
  page faults and ~6% of the rollout's time in the kernel.
* :func:`compile_module`: ``torch.compile`` of a module *in place* (``nn.Module.compile``): the object stays the
  same, so LoRA (peft), ``save_pretrained``, state dicts, EMA swaps and DDP wrapping keep working. Same fp32 math,
  only fused kernels (inductor's C++/OpenMP code on CPU, Triton on GPU); every new input shape / grad mode / LoRA
  on-off pays a compilation once (seconds on the tiny models, reported as ``compile_s`` by the benchmarks).
* :func:`force_eager`: run compiled modules eagerly inside the block (FLOP counting sees the aten ops).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from typing import Iterator

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: allocations below this come from the heap (glibc's default is dynamic, 128 KiB .. 32 MiB)
MMAP_THRESHOLD = 1 << 30
#: free heap kept instead of being returned to the OS
TRIM_THRESHOLD = 1 << 31


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """glibc only: serve allocations below ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold``
    bytes of free heap. Process-wide and permanent (the cost: up to ``trim_threshold`` more resident memory).
    Returns whether it applied (False on other platforms / C libraries)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):
        return False


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """Compile ``module``'s forward in place and return it. Shapes start static; a dimension seen with a second
    size becomes dynamic (torch's automatic dynamic shapes), so the last, smaller batch of an epoch does not
    recompile every time."""
    module.compile(dynamic=None)
    return module


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@contextlib.contextmanager
def force_eager() -> Iterator[None]:
    """Inside the block compiled modules run their eager code (``torch.compiler.set_stance("force_eager")``)."""
    with torch.compiler.set_stance("force_eager"):
        yield


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "compile_module", "force_eager", "is_compiled", "tune_malloc"]
