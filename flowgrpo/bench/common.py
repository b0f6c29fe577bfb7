"""Small helpers shared by the benchmarks: prompts, a transformer call counter/timer, CPU contention, memory."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

_COLOURS = "red blue green yellow black white orange purple pink brown".split()
_THINGS = "cat dog car house tree bird horse boat flower clock".split()
_STYLES = "photo painting sketch picture".split()


def bench_prompts(n: int) -> list[str]:
    """``n`` distinct short prompts (deterministic)."""
    out = []
    for i in range(n):
        c, t, s = _COLOURS[i % 10], _THINGS[(i // 10) % 10], _STYLES[(i // 100) % 4]
        out.append(f"a {s} of a {c} {t}" + (f" number {i // 400}" if i >= 400 else ""))
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux


class CallCounter:
    """Counts (and times) the calls of ``module.forward``: ``calls``, ``rows`` (batch dim of ``hidden_states``
    per call) and ``seconds`` (wall time inside the module). Use as a context manager; hooks are removed on exit."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.calls = 0
        self.rows: list[int] = []
        self.seconds = 0.0
        self._t0 = 0.0
        self._handles: list[Any] = []

    def _pre(self, mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.rows.append(int(x.shape[0]) if isinstance(x, torch.Tensor) else -1)
        self.calls += 1
        self._t0 = time.perf_counter()

    def _post(self, mod: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.seconds += time.perf_counter() - self._t0

    def reset(self) -> None:
        self.calls, self.rows, self.seconds = 0, [], 0.0

    def __enter__(self) -> "CallCounter":
        self._handles = [
            self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.module.register_forward_hook(self._post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Timed:
    """Wraps a callable, accumulating its wall time in ``seconds``."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def _proc_stat_busy() -> float | None:
    """Seconds of busy CPU time summed over every CPU since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        ticks = [int(v) for v in fields]
        busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMonitor:
    """Measures, over a ``with`` block, this process's CPU use and everyone else's (``other_cores``: average
    number of cores busy with other processes; > ~0.2 on a 2-core machine means the timings are disturbed)."""

    def __enter__(self) -> "CpuMonitor":
        self.t0 = time.perf_counter()
        self.own0 = sum(os.times()[:2])
        self.busy0 = _proc_stat_busy()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = max(time.perf_counter() - self.t0, 1e-9)
        self.own = sum(os.times()[:2]) - self.own0
        busy1 = _proc_stat_busy()
        self.other_cores = None
        if self.busy0 is not None and busy1 is not None:
            self.other_cores = max(0.0, (busy1 - self.busy0 - self.own) / self.wall)

    def report(self) -> dict[str, float | None]:
        return {
            "own_cores": round(self.own / self.wall, 3),
            "other_cores": None if self.other_cores is None else round(self.other_cores, 3),
        }


class Usage:
    """Accumulates this process's CPU user/system seconds and minor page faults over ``with`` blocks
    (``sys`` + ``minflt`` show allocator churn: freed memory given back to the OS and faulted in again)."""

    def __init__(self) -> None:
        self.user = self.sys = 0.0
        self.minflt = 0
        self.n = 0

    def __enter__(self) -> "Usage":
        self._r0 = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc: Any) -> None:
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.user += r1.ru_utime - self._r0.ru_utime
        self.sys += r1.ru_stime - self._r0.ru_stime
        self.minflt += r1.ru_minflt - self._r0.ru_minflt
        self.n += 1

    def per_run(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"user_s": round(self.user / n, 4), "sys_s": round(self.sys / n, 4), "minflt": self.minflt // n}


def environment() -> dict[str, Any]:
    """Threads / versions / load (for reading a result line later)."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return {
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__.split("+")[0],
        "load1_at_start": None if load1 is None else round(load1, 2),
    }


__all__ = ["CallCounter", "CpuMonitor", "Timed", "Usage", "bench_prompts", "environment", "median", "peak_rss_mb"]
