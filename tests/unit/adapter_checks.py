"""Shared pieces of the model-family adapter tests (tests/unit/test_models_*.py)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

PROMPTS = ["a photo of a cat", "two dogs"]


def velocity_inputs(adapter: Any, resolution: int = 64, negative_prompt: str = "") -> tuple:
    """(x [2, *latent_shape], sigma [2], cond, 1-row negative): fixed seeds, two prompts."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *adapter.latent_shape(resolution), generator=g)
    sigma = torch.tensor([0.9, 0.4])
    return x, sigma, adapter.encode_prompts(PROMPTS), adapter.encode_prompts([negative_prompt])


def perturb(params: Iterable[torch.nn.Parameter], scale: float = 0.2) -> None:
    """Add seeded Gaussian noise to ``params`` in place (moves LoRA B away from 0, or any weights)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))
