"""Exponential moving average of the trainable parameters (used for evaluation and export only;
training always continues from the raw weights)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    """shadow <- d * shadow + (1 - d) * param, with the warm-up d = min((1 + n) / (10 + n), decay),
    updated every ``update_every`` optimizer steps (n = optimizer step count)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float = 0.9, update_every: int = 8):
        self.params = list(params)
        self.decay, self.update_every = decay, update_every
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def step(self, optimizer_step: int) -> None:
        if optimizer_step % self.update_every:
            return
        d = min((1 + optimizer_step) / (10 + optimizer_step), self.decay)
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}": s.cpu() for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, model has {len(self.shadow)} trainable params")
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"{i}"])
