"""Stable Diffusion 3 / 3.5 adapter: :class:`~flowgrpo.models.base.ModelAdapter` over ``StableDiffusion3Pipeline``.

Precision policy
    * VAE: frozen, fp32.  Text encoders: frozen, in the mixed-precision dtype on CUDA, fp32 elsewhere.
    * Transformer: fp32 master weights (LoRA weights too). With ``mixed_precision`` "fp16"/"bf16" every transformer
      call (sampling, training and reference alike) runs under ``torch.autocast(device.type, dtype)``, so the
      rollout's and the trainer's log-probs come from bit-identical computations (importance ratio exactly 1).
    * Everything returned (conditioning, velocity, images) is fp32.

Timestep convention: SD3's transformer takes ``timestep = sigma * num_train_timesteps`` (1000), exactly what
``FlowMatchEulerDiscreteScheduler`` feeds it.

diffusers/peft are imported lazily (importing diffusers costs seconds).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .base import Conditioning, guided
from .common import DiffusersAdapterBase, compute_dtype, dtype_kwarg

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

#: default LoRA targets: every attention projection of the joint (MM-DiT) blocks, image and context stream
SD3_LORA_TARGETS: list[str] = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]


class SD3Adapter(DiffusersAdapterBase):
    """SD3 adapter. Build with :meth:`from_pretrained` (a diffusers directory) or :meth:`from_pipeline`.

    Attributes: ``pipe`` (the pipeline, holding the frozen VAE/text encoders), ``transformer`` (the unwrapped
    policy network), ``lora_config`` (peft ``LoraConfig`` or None), ``device``, ``dtype`` (autocast dtype or None).
    LoRA, reference policy, trainable state and the merged export come from
    :class:`~flowgrpo.models.common.DiffusersAdapterBase`.

    Full fine-tuning (``full_finetune=True``): the whole transformer is trainable. With ``needs_reference=True``
    (the default) a frozen deep copy of the *initial* transformer is taken at construction (taking it lazily
    would capture already-trained weights) and :meth:`reference` switches ``velocity`` to it. Pass
    ``needs_reference=False`` when the KL term is off to save the memory; :meth:`reference` then raises.
    """

    family = "sd3"
    default_lora_targets = tuple(SD3_LORA_TARGETS)
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(
        self,
        pipe: "StableDiffusion3Pipeline",
        device: str | torch.device = "cpu",
        mixed_precision: str = "no",
        max_sequence_length: int = 128,
        full_finetune: bool = False,
        needs_reference: bool = True,
    ) -> None:
        super().__init__(pipe, device=device, mixed_precision=mixed_precision, full_finetune=full_finetune,
                         needs_reference=needs_reference)
        self.max_sequence_length = int(max_sequence_length)
        self._sigmas: dict[int, torch.Tensor] = {}

        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        self.shift_factor = float(getattr(pipe.vae.config, "shift_factor", None) or 0.0)
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.patch_size = int(self.transformer.config.patch_size)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pipeline(cls, pipe: "StableDiffusion3Pipeline", **kwargs: Any) -> "SD3Adapter":
        """Wrap an in-memory pipeline (its modules are moved/cast in place); kwargs as for the constructor."""
        return cls(pipe, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu", mixed_precision: str = "no",
                        **kwargs: Any) -> "SD3Adapter":
        """Load a local diffusers-format SD3 directory (see :func:`flowgrpo.models.loading.resolve_model_path`).
        Text encoders are loaded directly in the compute dtype on CUDA (T5-XXL in fp32 would need ~19 GB)."""
        from diffusers import StableDiffusion3Pipeline

        dtype = compute_dtype(mixed_precision)
        torch_dtype: Any = torch.float32
        if dtype is not None and torch.device(device).type == "cuda":
            torch_dtype = {"transformer": torch.float32, "vae": torch.float32, "default": dtype}
        pipe = StableDiffusion3Pipeline.from_pretrained(str(path), **{dtype_kwarg(): torch_dtype})
        return cls(pipe, device=device, mixed_precision=mixed_precision, **kwargs)

    # ---------------------------------------------------------------------------------------------- geometry

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(16, res/8, res/8) for SD3; ``resolution`` must be a multiple of vae_scale_factor * patch_size."""
        mult = self.vae_scale_factor * self.patch_size
        if resolution % mult:
            raise ValueError(f"resolution {resolution} must be a multiple of {mult} for this SD3 model")
        side = resolution // self.vae_scale_factor
        return (int(self.pipe.vae.config.latent_channels), side, side)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """fp32 [num_steps + 1] on CPU: exactly ``scheduler.set_timesteps(num_steps)``'s ``sigmas`` (shifted,
        trailing 0), from a fresh scheduler copy so the pipeline's scheduler state is never touched."""
        if num_steps not in self._sigmas:
            sched_cfg = self.pipe.scheduler.config
            if sched_cfg.get("use_dynamic_shifting", False):
                raise NotImplementedError("resolution-dependent shifting (use_dynamic_shifting) is not supported")
            sched = type(self.pipe.scheduler).from_config(sched_cfg)
            sched.set_timesteps(num_steps, device="cpu")
            self._sigmas[num_steps] = sched.sigmas.to(torch.float32).clone()
        return self._sigmas[num_steps].clone()

    # ------------------------------------------------------------------------------------------------- text

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """{"prompt_embeds": fp32 [B, 77 + max_sequence_length, joint_dim], "pooled_prompt_embeds": fp32 [B, Dp]}."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        pe, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": pe.float(), "pooled_prompt_embeds": pooled.float()}

    # --------------------------------------------------------------------------------------------- velocity

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
        negative: Conditioning | None = None,
        model: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """v(x_t, sigma), fp32 [B, C, H, W]. guidance_scale > 1: ONE transformer call on [negative; positive]
        (2B rows), v = v_u + w (v_c - v_u); otherwise one call on B rows. A 1-row ``negative`` is broadcast."""
        cfg = guidance_scale > 1.0
        x, s, c = self._velocity_inputs(latents, sigma, cond, negative, cfg)  # [N, C, H, W], [N], N = B or 2B
        net = self._network(model)
        with self._autocast():
            out = net(
                hidden_states=x,
                encoder_hidden_states=c["prompt_embeds"],
                pooled_projections=c["pooled_prompt_embeds"],
                timestep=s * self.num_train_timesteps,
                return_dict=False,
            )[0]
        out = out.float()
        return guided(out, guidance_scale) if cfg else out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, h, w] -> fp32 images [B, 3, 8h, 8w] in [0, 1]."""
        vae = self.pipe.vae
        z = latents.to(self.device, vae.dtype) / self.scaling_factor + self.shift_factor
        x = vae.decode(z, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)


__all__ = ["SD3Adapter", "SD3_LORA_TARGETS"]
