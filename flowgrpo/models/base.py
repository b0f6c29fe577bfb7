"""The model adapter protocol: the only surface the rollout, the loss and the recipe touch.

One adapter per model family (SD3, FLUX.1, FLUX.1-Kontext, Qwen-Image(-Edit), Wan2.1) hides the family's text encoders,
latent layout, guidance convention and VAE. Everything the trainer needs is here:

* ``encode_prompts``  - text -> :data:`Conditioning` (called once per *unique* prompt by the rollout)
* ``velocity``        - the flow-matching velocity v(x_t, sigma) with or without CFG, always fp32 out
* ``decode``          - final latents -> images in [0, 1] (called once per final latent)
* ``sigmas``          - the family's (shifted) sigma schedule for a step count
* ``add_lora`` / ``trainable_parameters`` / ``reference`` - what is trained, and the KL reference policy
* ``trainable_state_dict`` / ``load_trainable_state_dict`` / ``save_pretrained`` - checkpoints and export

Conditioning is a plain ``dict[str, Tensor]`` whose tensors all have the batch as their first dim, so the
rollout can index, repeat and concatenate it without knowing the family.

Edit families (``edit = True``: FLUX.1-Kontext, Qwen-Image-Edit) condition on a source image too:
``encode_prompts(prompts, images)`` takes the sources (fp32 [B, 3, R, R] in [0, 1]) and puts what the velocity needs
about them into the conditioning rows (see :mod:`flowgrpo.edit`). Video families (Wan2.1) have 5-D latents
``[B, C, F, H, W]``: ``latent_shape`` returns ``(C, F, H, W)`` and ``decode`` returns ``[B, F, 3, H, W]``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Protocol, Sequence, runtime_checkable

import torch

Conditioning = dict[str, torch.Tensor]


def select(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    """Rows ``index`` of every tensor of ``cond`` (index: LongTensor [N])."""
    return {k: v.index_select(0, index.to(v.device)) for k, v in cond.items()}


def expand(cond: Conditioning, batch: int) -> Conditioning:
    """Broadcast a single-row conditioning (e.g. the empty negative prompt) to ``batch`` rows."""
    return {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}


def broadcast_rows(cond: Conditioning, batch: int, device: torch.device | str | None = None) -> Conditioning:
    """A 1-row conditioning broadcast to ``batch`` rows (tensors of other lengths unchanged), moved to ``device``."""
    return {k: (t.expand(batch, *t.shape[1:]) if len(t) == 1 else t).to(device) for k, t in cond.items()}


def guided(out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) on one call's output over [negative; positive] rows:
    [2B, ...] -> v_u + w (v_c - v_u) [B, ...]."""
    v_u, v_c = out.chunk(2)  # [B, ...] each
    return v_u + guidance_scale * (v_c - v_u)


@runtime_checkable
class ModelAdapter(Protocol):
    family: str
    device: torch.device
    #: the policy network (the module that gets LoRA, the optimizer and the DDP/DeepSpeed wrapper)
    transformer: torch.nn.Module

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """(C, H, W) of the latent for a square image of ``resolution`` pixels ((C, F, H, W) for video)."""

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """fp32 [num_steps + 1] decreasing from 1 to 0 (the family's shifted schedule)."""

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """No-grad text encoding, one row per prompt (no de-duplication here)."""

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
        negative: Conditioning | None = None,
        model: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Velocity v ~ eps - x0 at noise level ``sigma``.

        latents [B, C, H, W]; sigma [B] in (0, 1]; cond rows [B]; negative rows [B] (needed when
        guidance_scale > 1: one transformer call on the 2B batch [negative; positive], then
        v = v_u + w (v_c - v_u)); guidance_scale <= 1 means one call, no negative.
        ``model`` overrides ``self.transformer`` (pass the DDP/DeepSpeed-wrapped module when training).
        Returns fp32 [B, C, H, W].
        """

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, H, W] -> images fp32 [B, 3, H*f, W*f] in [0, 1]."""

    def add_lora(self, rank: int, alpha: int, target_modules: Sequence[str], init: str = "gaussian") -> None:
        """Attach a LoRA adapter to the transformer; afterwards only LoRA weights are trainable."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (LoRA weights, or the whole transformer)."""

    def reference(self) -> ContextManager[None]:
        """Context in which ``velocity`` computes the reference policy (LoRA disabled).

        Full fine-tuning keeps a frozen copy of the initial transformer for this.
        """

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Named tensors of the trainable parameters (what a checkpoint stores)."""

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict` (strict)."""

    def save_pretrained(self, out_dir: str) -> None:
        """Write a complete diffusers-format pipeline directory (LoRA merged into the weights)."""


def null_context() -> ContextManager[None]:
    return contextlib.nullcontext()


def iter_named_trainable(module: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Parameter]]:
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)
