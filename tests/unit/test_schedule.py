"""Sigma schedule and step windows (flowgrpo.schedule)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from flowgrpo import schedule


@pytest.mark.parametrize("n", [1, 2, 10, 40])
def test_shifted_sigmas_match_diffusers(n):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(n)
    ours = schedule.shifted_sigmas(n, 3.0)
    assert ours.shape == (n + 1,)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-6, rtol=0)


def test_shifted_sigmas_sd35m_reference():
    ref = torch.tensor([1.0, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465, 0.278, 0.0089, 0.0])
    torch.testing.assert_close(schedule.shifted_sigmas(10), ref, atol=1e-3, rtol=0)


def test_shifted_sigmas_properties():
    s = schedule.shifted_sigmas(40, 3.0)
    assert s[0] == 1.0 and s[-1] == 0.0
    assert torch.all(s[1:] < s[:-1])  # strictly decreasing
    # shift 1 is the plain linear schedule from 1 to 1/1000
    lin = schedule.shifted_sigmas(5, 1.0)
    torch.testing.assert_close(lin[:-1], torch.linspace(1.0, 1e-3, 5), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        schedule.shifted_sigmas(0)


def test_full_window():
    w = schedule.full_window(10, 0.99)  # int(9.9) = 9: train steps 0..8, skip the near-deterministic last
    assert w.num_train == 9
    assert [i for i in range(10) if w.is_trained(i)] == list(range(9))
    assert all(w.is_stochastic(i) for i in range(10))
    assert not w.is_trained(9)
    assert schedule.full_window(1, 0.5).num_train == 1  # at least one trained step


def test_random_window_uniform_over_allowed_starts():
    rng = random.Random(0)
    num_steps, size, lo, hi = 10, 2, 1, 8
    n = 6000
    starts = Counter()
    for _ in range(n):
        w = schedule.random_window(num_steps, size, lo, hi, rng)
        assert w.train_start == w.noise_start and w.train_end == w.noise_end == w.noise_start + size
        assert w.num_train == size
        starts[w.noise_start] += 1
    allowed = list(range(lo, hi - size + 1))  # 1..6 inclusive
    assert sorted(starts) == allowed
    expected = n / len(allowed)  # 1000, binomial std ~ 29
    assert all(abs(c - expected) < 150 for c in starts.values())


def test_random_window_steps():
    w = schedule.random_window(10, 3, 4, 7, random.Random(1))  # only start 4 fits
    assert (w.noise_start, w.noise_end) == (4, 7)
    assert [i for i in range(10) if w.is_stochastic(i)] == [4, 5, 6]
    assert [i for i in range(10) if w.is_trained(i)] == [4, 5, 6]


def test_random_window_deterministic():
    a = [schedule.random_window(10, 2, 0, 10, random.Random(7)).noise_start for _ in range(3)]
    assert len(set(a)) == 1


@pytest.mark.parametrize(
    "size,lo,hi",
    [(0, 0, 5), (6, 0, 5), (3, 4, 6), (2, -1, 5), (2, 0, 11)],
)
def test_random_window_invalid(size, lo, hi):
    with pytest.raises(ValueError):
        schedule.random_window(10, size, lo, hi, random.Random(0))
