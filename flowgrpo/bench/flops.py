"""FLOP counting and the machine's measured matmul peak (the denominator of MFU).

* :func:`measure_matmul_peak` - best fp32 FLOP/s of square ``a @ b`` over a few sizes, in this process, with
  torch's current thread count (so MFU compares the model against what this process can actually get).
* :func:`count_flops` - runs a callable once under :class:`torch.utils.flop_counter.FlopCounterMode` and returns
  (result, FLOPs). The counter only knows matmul/conv/attention-type ops (elementwise ops count 0); CPU SDPA
  (``_scaled_dot_product_flash_attention_for_cpu`` and its backward) is not in torch's registry, so it is added
  here with torch's own SDPA formulas.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from torch.utils import flop_counter as _fc

_aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)  # 2 matmuls: 4 b h s_q s_k d


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None,
                            **kwargs: Any) -> int:
    return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    fwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in _fc.flop_registry:
        mapping[fwd] = _sdpa_cpu_flop  # (query, key, value, ...)
    if bwd is not None and bwd not in _fc.flop_registry:
        mapping[bwd] = _sdpa_cpu_backward_flop  # (grad_out, query, key, value, out, logsumexp, ...)
    return mapping


def flop_counter() -> _fc.FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU flash attention."""
    return _fc.FlopCounterMode(display=False, custom_mapping=_custom_mapping())


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` once under the FLOP counter; returns (its result, total FLOPs)."""
    with flop_counter() as counter:
        result = fn(*args, **kwargs)
    return result, int(counter.get_total_flops())


def measure_matmul_peak(
    sizes: Sequence[int] = (256, 512, 1024, 2048),
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    min_seconds: float = 0.02,
) -> float:
    """Best measured FLOP/s of a square ``n x n @ n x n`` matmul (2 n^3 FLOPs) over ``sizes``.

    Each size: two warm-up products, then ``repeats`` timings, each of enough back-to-back products to last at
    least ``min_seconds`` (so tiny sizes are not timer-bound); the best of all is returned. Runs with torch's
    current thread count (``torch.get_num_threads()``). Takes ~1 s on a 2-core CPU.
    """
    best = 0.0
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=gen, dtype=torch.float32).to(dtype)
        b = torch.randn(n, n, generator=gen, dtype=torch.float32).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b, out=out)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        one = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, int(min_seconds / one))
        flop = 2.0 * n**3 * inner
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=out)
            dt = time.perf_counter() - t0
            best = max(best, flop / dt)
    return best


__all__ = ["count_flops", "flop_counter", "measure_matmul_peak"]
