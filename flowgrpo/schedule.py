"""Sigma schedules and the choice of which steps are stochastic / trained.

``shifted_sigmas`` reproduces diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` for a static
shift (SD3: shift 3): sigmas linearly spaced between 1 and the scheduler's shifted ``sigma_min``, shifted
again with ``shift * s / (1 + (shift - 1) s)``, with a trailing 0.

``StepWindow`` says which steps of a T-step trajectory are sampled with the SDE (``noise``) and which
transitions are recorded for training (``train``):
* full Flow-GRPO: every step is stochastic, the first ``int(T * timestep_fraction)`` are trained (the last,
  near-deterministic step is skipped);
* Flow-GRPO-Fast / MixGRPO: only a window of ``size`` consecutive steps starting in ``[lo, hi - size]`` is
  stochastic and trained, everything else is the Euler ODE.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


def shifted_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """fp32 [num_steps + 1]: the SD3 inference schedule (1 -> ~0) plus a trailing 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: must be >= 1")

    def shift_fn(s: torch.Tensor) -> torch.Tensor:
        return shift * s / (1 + (shift - 1) * s)

    sigma_min = shift_fn(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64))
    s = torch.linspace(1.0, float(sigma_min), num_steps, dtype=torch.float64)
    return torch.cat([shift_fn(s), torch.zeros(1, dtype=torch.float64)]).float()


@dataclass(frozen=True)
class StepWindow:
    """Half-open step ranges [start, end) of a trajectory of ``num_steps`` steps."""

    num_steps: int
    noise_start: int
    noise_end: int
    train_start: int
    train_end: int

    @property
    def num_train(self) -> int:
        return self.train_end - self.train_start

    def is_stochastic(self, i: int) -> bool:
        return self.noise_start <= i < self.noise_end

    def is_trained(self, i: int) -> bool:
        return self.train_start <= i < self.train_end


def full_window(num_steps: int, timestep_fraction: float = 0.99) -> StepWindow:
    """All steps stochastic; train the first ``int(num_steps * timestep_fraction)`` (>= 1)."""
    n_train = max(1, int(num_steps * timestep_fraction))
    return StepWindow(num_steps, 0, num_steps, 0, n_train)


def random_window(num_steps: int, size: int, lo: int, hi: int, rng: random.Random) -> StepWindow:
    """Fast window: start ~ U{lo, ..., hi - size} (inclusive), steps [start, start + size) stochastic+trained."""
    if not (0 <= lo and hi <= num_steps and 1 <= size <= hi - lo):
        raise ValueError(f"window size={size} range=({lo}, {hi}) does not fit in {num_steps} steps")
    start = rng.randint(lo, hi - size)
    return StepWindow(num_steps, start, start + size, start, start + size)
