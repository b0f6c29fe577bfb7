"""Smoke tests of ``flowgrpo bench`` on the 64 px "tiny" spec (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flowgrpo.bench import count_flops, measure_matmul_peak, run_bench  # noqa: E402
from flowgrpo.bench.common import CallCounter, CpuMonitor, bench_prompts  # noqa: E402

SMALL_PEAK = (64, 128)  # keeps the matmul-peak measurement in the milliseconds


@pytest.fixture
def one_thread():
    """The benches run in-process with one thread (robust when other test processes share the CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _args(model: Path, what: str, **kw) -> types.SimpleNamespace:
    base = dict(what=what, model=str(model), batch=2, steps=2, resolution=64, guidance=4.5, window=0, repeats=1,
                peak_sizes=SMALL_PEAK)
    base.update(kw)
    return types.SimpleNamespace(**base)


def _positive_finite(out: dict, keys: list[str]) -> None:
    for k in keys:
        v = out[k]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (k, v)


def test_count_flops_and_peak() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(torch.mm, a, b)[1] == 2 * 8 * 16 * 4
    q = torch.randn(2, 3, 10, 8)
    _, f = count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert f == 4 * 2 * 3 * 10 * 10 * 8  # CPU flash attention is counted too (QK^T and PV)
    peak = measure_matmul_peak(sizes=SMALL_PEAK, repeats=2)
    assert math.isfinite(peak) and peak > 1e6
    assert len(set(bench_prompts(50))) == 50


def test_call_counter_and_cpu_monitor() -> None:
    lin = torch.nn.Linear(4, 4)
    with CpuMonitor() as mon, CallCounter(lin) as calls:
        lin(torch.randn(3, 4))
        lin(torch.randn(5, 4))
    lin(torch.randn(1, 4))  # hooks removed on exit
    assert calls.calls == 2 and calls.rows == [3, 5] and calls.seconds >= 0
    assert set(mon.report()) == {"own_cores", "other_cores"}


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_bench_rollout_tiny(tiny_model_dir: Path, one_thread, guidance: float) -> None:
    out = run_bench(_args(tiny_model_dir, "rollout", guidance=guidance))
    json.loads(json.dumps(out))  # what the CLI prints
    assert torch.get_num_threads() == 1
    _positive_finite(out, ["images_per_s", "s_per_image", "peak_rss_mb", "flops_per_image", "achieved_flops",
                           "matmul_peak_flops", "mfu", "baseline_images_per_s", "speedup_vs_baseline",
                           "transformer_flops_per_image"])
    assert 0 < out["mfu"] < 1.5
    assert out["flops_per_image"] > out["transformer_flops_per_image"]  # + text encoders and VAE
    # one transformer call per step with and without CFG (CFG: one call on the 2B batch)
    assert out["transformer_calls_per_step"] == 1.0
    assert out["baseline_transformer_calls_per_step"] == 1.0
    assert out["transformer_rows_per_call"] == (4 if guidance > 1 else 2)
    assert set(out["phases_s"]) == {"encode", "transformer", "step_math", "decode"}
    assert out["image_shape"] == [2, 3, 64, 64]
    for k in ("guidance", "batch", "steps", "resolution", "model"):
        assert k in out


def test_bench_rollout_compiled_matches_eager(tiny_model_dir: Path, one_thread) -> None:
    """--compile: the recipe's in-place compilation; FLOPs are still counted (on the eager code), the diffusers
    baseline runs eagerly, and the compiled images equal the eager ones up to fp32 rounding."""
    out = run_bench(_args(tiny_model_dir, "rollout", compile=True))
    assert out["speedups"]["compile"] is True and out["speedups"]["malloc_tune"] in (True, False)
    assert out["compile_s"] is not None and out["compile_s"] >= 0
    assert 0 <= out["compiled_vs_eager_max_abs_diff"] < 1e-3
    assert out["transformer_calls_per_step"] == 1.0 and out["transformer_flops_per_image"] > 0
    _positive_finite(out, ["images_per_s", "baseline_images_per_s", "mfu"])


@pytest.mark.parametrize("guidance,steps,window", [(4.5, 2, 0), (1.0, 3, 1)])
def test_bench_train_tiny(tiny_model_dir: Path, one_thread, guidance: float, steps: int, window: int) -> None:
    out = run_bench(_args(tiny_model_dir, "train", guidance=guidance, steps=steps, window=window))
    json.loads(json.dumps(out))
    _positive_finite(out, ["s_per_train_step", "flops_per_train_step", "forward_flops_per_train_step", "mfu",
                           "matmul_peak_flops", "s_per_epoch_update", "peak_rss_mb", "trainable_params"])
    assert 0 < out["mfu"] < 1.5
    assert out["flops_per_train_step"] > out["forward_flops_per_train_step"]  # + backward
    assert out["transformer_calls_per_train_step"] == 1
    assert out["transformer_rows_per_call"] == (4 if guidance > 1 else 2)
    assert out["finetune"] == "lora_r32_a64"
    if window:
        assert out["trained_steps"] == window and out["full_trained_steps"] == int(steps * 0.99)
        _positive_finite(out, ["s_per_full_update", "fast_speedup"])
    else:
        assert out["trained_steps"] == int(steps * 0.99) and "fast_speedup" not in out


def test_bench_cli_prints_one_json_line(tiny_model_dir: Path, one_thread, monkeypatch, capsys) -> None:
    from flowgrpo import cli
    from flowgrpo.bench import train as bench_train_mod

    monkeypatch.setattr(bench_train_mod, "measure_matmul_peak", lambda **kw: measure_matmul_peak(sizes=SMALL_PEAK))
    rc = cli.main(["bench", "train", "--model", str(tiny_model_dir), "--batch", "2", "--steps", "2",
                   "--resolution", "64", "--repeats", "1", "--guidance", "1.0"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert rc == 0 and len(lines) == 1
    assert json.loads(lines[0])["bench"] == "train"
