"""Wan2.1 text-to-video adapter: :class:`~flowgrpo.models.base.ModelAdapter` over diffusers' ``WanPipeline``.

Latent layout
    Video latents are 5-D, ``[B, C, F, H, W]`` (C = 16 for Wan2.1): the causal 3-D VAE compresses 8x in space and 4x
    in time, so a clip of ``num_frames = 4k + 1`` frames at ``r x r`` pixels has ``k + 1`` latent frames of
    ``r/8 x r/8`` (:meth:`WanAdapter.latent_shape` returns the 4-tuple ``(C, F, H, W)``). The transformer patchifies
    ``(1, 2, 2)`` internally and returns the velocity in the latent's own shape, so no packing happens here. The
    rollout, the SDE step and the losses are shape-agnostic over the non-batch dims (log-probs and KL are means over
    ``C x F x H x W``).

Clip length
    ``num_frames`` is an adapter attribute (settable; must be ``4k + 1``): the constructor argument, else the
    ``num_frames`` of a tiny model's marker JSON (:mod:`flowgrpo.models.tiny_wan`), else
    :data:`DEFAULT_NUM_FRAMES` = 33 (upstream Flow-GRPO's Wan2.1 training clips; ``WanPipeline``'s own default is 81).
    Clips are square (``resolution x resolution``) like the other families (upstream trains at 240 x 416).

Timestep convention
    ``WanPipeline`` feeds the transformer the scheduler's timestep, ``t = 1000 sigma`` (in [0, 1000]); the
    transformer embeds it sinusoidally. We pass ``1000 * sigma`` as a float (the pipeline's UniPC scheduler rounds it
    down to an integer).

Schedule
    Wan2.1 samples with ``UniPCMultistepScheduler`` (flow sigmas, static ``flow_shift`` 3.0, a multistep solver).
    Flow-GRPO needs one-step Gaussian transitions, so we keep Wan's *sigmas* and replace the solver by the Euler /
    SDE step: :func:`wan_sigmas` = ``shift(linspace(1, 1/1000, T + 1)[:-1])`` with ``shift(s) = k s / (1 + (k - 1) s)``
    and a trailing 0, exactly UniPC's flow sigmas (which nudge the first one to ``1 - 1e-6``, a log-safety detail of
    UniPC that we drop so the schedule starts at 1). A ``FlowMatchEulerDiscreteScheduler`` (``shift`` instead of
    ``flow_shift``) gives the same sigmas from ``set_timesteps(sigmas=linspace(1, 1/1000, T + 1)[:-1])``.

Guidance
    Classifier-free guidance as SD3: ``guidance_scale > 1`` is one transformer call on the 2B batch
    ``[negative; positive]``, ``v = v_u + w (v_c - v_u)``; the negative is upstream's empty prompt.

Decoding
    ``z * latents_std + latents_mean`` (per-channel statistics of the VAE config), then the VAE, then frames first:
    fp32 ``[B, F, 3, H, W]`` in [0, 1].

Precision: see :class:`~flowgrpo.models.common.DiffusersAdapterBase` (fp32 master weights + autocast; upstream trains
Wan in bf16: fp16 does not produce valid videos).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .base import Conditioning, guided
from .common import DiffusersAdapterBase, compute_dtype, dtype_kwarg
from .tiny import TINY_MARKER

if TYPE_CHECKING:
    from diffusers import WanPipeline

#: default LoRA targets, as upstream Flow-GRPO's Wan2.1 trainer (``scripts/train_wan2_1.py``): the q/k/v/out projections
#: of every attention (self-attention ``attn1`` and text cross-attention ``attn2``); ``add_k_proj``/``add_v_proj``
#: exist only in the image-to-video models (image cross-attention). Upstream's list also names FLUX's
#: ``add_q_proj``/``to_add_out``, which Wan does not have.
WAN_LORA_TARGETS: list[str] = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
#: the feed-forward of every block, for ``model.lora_targets`` = WAN_LORA_TARGETS + these (not upstream's default)
WAN_FFN_LORA_TARGETS: list[str] = ["ffn.net.0.proj", "ffn.net.2"]
#: clip length when neither the caller nor the model says (upstream Flow-GRPO's Wan2.1 setting)
DEFAULT_NUM_FRAMES = 33


def wan_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """fp32 [num_steps + 1]: ``shift(linspace(1, 1/N, T + 1)[:-1])`` then 0, ``shift(s) = k s / (1 + (k - 1) s)``
    (Wan's static flow shift; computed in float64 as the schedulers do, then cast)."""
    import numpy as np

    base = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]  # [T]
    shifted = shift * base / (1 + (shift - 1) * base)
    return torch.from_numpy(np.concatenate([shifted, [0.0]]).astype(np.float32))


def frames_first(video: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, F, H, W] -> [B, F, 3, H, W]."""
    return video.permute(0, 2, 1, 3, 4)


class WanAdapter(DiffusersAdapterBase):
    """Wan2.1 text-to-video adapter. Build with :meth:`from_pretrained` (a diffusers directory) or
    :meth:`from_pipeline`.

    Beyond the protocol: ``num_frames`` (clip length, ``4k + 1``; settable), ``flow_shift``, ``latents_mean`` /
    ``latents_std`` ([1, C, 1, 1, 1] fp32), ``num_latent_frames``.
    """

    family = "wan"
    default_lora_targets = tuple(WAN_LORA_TARGETS)
    text_encoder_names = ("text_encoder",)

    def __init__(
        self,
        pipe: "WanPipeline",
        device: str | torch.device = "cpu",
        mixed_precision: str = "no",
        max_sequence_length: int = 512,
        full_finetune: bool = False,
        needs_reference: bool = True,
        num_frames: int | None = None,
        transformer_dtype: torch.dtype = torch.float32,
    ) -> None:
        if getattr(pipe, "transformer_2", None) is not None:
            raise NotImplementedError("two-expert Wan2.2 pipelines (transformer_2) are not supported")
        super().__init__(pipe, device=device, mixed_precision=mixed_precision, full_finetune=full_finetune,
                         needs_reference=needs_reference, transformer_dtype=transformer_dtype)
        cfg = self.transformer.config
        if tuple(cfg.patch_size) != (1, 2, 2):
            raise NotImplementedError(f"Wan transformers with patch_size={tuple(cfg.patch_size)} are not supported")
        if getattr(cfg, "image_dim", None):
            raise NotImplementedError("image-to-video Wan transformers (image_dim) are not supported")
        self.max_sequence_length = int(max_sequence_length)
        self.latent_channels = int(cfg.in_channels)
        vae_cfg = pipe.vae.config
        self.temporal_factor = int(getattr(vae_cfg, "scale_factor_temporal", None) or 4)
        self.spatial_factor = int(getattr(vae_cfg, "scale_factor_spatial", None) or 8)
        z = int(vae_cfg.z_dim)
        self.latents_mean = torch.tensor(vae_cfg.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.latents_std = torch.tensor(vae_cfg.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
        sched_cfg = pipe.scheduler.config
        if sched_cfg.get("use_dynamic_shifting", False):
            raise NotImplementedError("resolution-dependent shifting (use_dynamic_shifting) is not supported")
        self.flow_shift = float(sched_cfg.get("flow_shift", sched_cfg.get("shift", 1.0)) or 1.0)
        self.num_train_timesteps = int(sched_cfg.get("num_train_timesteps", 1000))
        self._sigmas: dict[int, torch.Tensor] = {}
        self._num_frames = 0
        self.num_frames = int(num_frames if num_frames is not None else DEFAULT_NUM_FRAMES)

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pipeline(cls, pipe: "WanPipeline", **kwargs: Any) -> "WanAdapter":
        """Wrap an in-memory pipeline (its modules are moved/cast in place); kwargs as for the constructor."""
        return cls(pipe, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu", mixed_precision: str = "no",
                        **kwargs: Any) -> "WanAdapter":
        """Load a local diffusers-format Wan directory. On CUDA with mixed precision the UMT5 encoder is loaded
        directly in the compute dtype (UMT5-XXL in fp32 needs ~22 GB), the transformer in ``transformer_dtype``
        (default fp32 master weights), the VAE in fp32. ``num_frames`` defaults to the tiny marker's, else 33."""
        from diffusers import WanPipeline

        dtype = compute_dtype(mixed_precision)
        torch_dtype: Any = torch.float32
        if dtype is not None and torch.device(device).type == "cuda":
            tdtype = kwargs.get("transformer_dtype", torch.float32)
            torch_dtype = {"transformer": tdtype, "vae": torch.float32, "default": dtype}
        if kwargs.get("num_frames") is None:
            kwargs["num_frames"] = marker_num_frames(path)
        pipe = WanPipeline.from_pretrained(str(path), **{dtype_kwarg(): torch_dtype})
        return cls(pipe, device=device, mixed_precision=mixed_precision, **kwargs)

    # ---------------------------------------------------------------------------------------------- geometry

    @property
    def num_frames(self) -> int:
        """Frames per generated clip (``4k + 1``)."""
        return self._num_frames

    @num_frames.setter
    def num_frames(self, value: int) -> None:
        value = int(value)
        if value < 1 or (value - 1) % self.temporal_factor:
            raise ValueError(f"num_frames must be {self.temporal_factor}k + 1 (Wan's causal VAE), got {value}")
        self._num_frames = value

    @property
    def num_latent_frames(self) -> int:
        return (self._num_frames - 1) // self.temporal_factor + 1

    def latent_shape(self, resolution: int) -> tuple[int, int, int, int]:
        """(C, F', res/8, res/8) with F' = (num_frames - 1) / 4 + 1; ``resolution`` must be a multiple of 16 (VAE 8x x
        2x2 patches)."""
        multiple = self.spatial_factor * 2
        if resolution <= 0 or resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a positive multiple of {multiple} for Wan "
                             f"(VAE factor {self.spatial_factor} x 2x2 patches)")
        side = resolution // self.spatial_factor
        return (self.latent_channels, self.num_latent_frames, side, side)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """fp32 [num_steps + 1] on CPU: Wan's flow-shifted sigmas, 1 -> 0 (:func:`wan_sigmas` with
        :attr:`flow_shift`)."""
        if num_steps not in self._sigmas:
            self._sigmas[num_steps] = wan_sigmas(num_steps, self.flow_shift, self.num_train_timesteps)
        return self._sigmas[num_steps].clone()

    # ------------------------------------------------------------------------------------------------- text

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """{"prompt_embeds": fp32 [B, max_sequence_length, UMT5 dim]}: UMT5's last hidden state, zeroed after each
        prompt's tokens (``WanPipeline.encode_prompt``: the transformer takes no text mask)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        pe, _ = self.pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"prompt_embeds": pe.float()}

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
        """v(x_t, sigma), fp32 [B, C, F, H, W] for latents [B, C, F, H, W]. guidance_scale > 1: ONE transformer call
        on [negative; positive] (2B rows), v = v_u + w (v_c - v_u); otherwise one call on B rows. A 1-row
        ``negative`` is broadcast."""
        cfg = guidance_scale > 1.0
        x, s, c = self._velocity_inputs(latents, sigma, cond, negative, cfg)  # [N, C, F, H, W], [N], N = B or 2B
        net = self._network(model)
        with self._autocast():
            out = net(
                hidden_states=x,
                timestep=s * self.num_train_timesteps,  # [N] in [0, 1000]
                encoder_hidden_states=c["prompt_embeds"],
                return_dict=False,
            )[0]
        out = out.float()  # [N, C, F, H, W]
        return guided(out, guidance_scale) if cfg else out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, F', h, w] -> fp32 videos [B, F, 3, 8h, 8w] in [0, 1], F = 4 (F' - 1) + 1
        (z * latents_std + latents_mean, VAE, frames first)."""
        vae = self.pipe.vae
        z = latents.to(self.device, torch.float32)
        z = (z * self.latents_std.to(z.device) + self.latents_mean.to(z.device)).to(vae.dtype)  # [B, C, F', h, w]
        # one clip at a time: the causal VAE's activations for a 33-frame 320 px clip are already ~1 GB
        x = torch.cat([vae.decode(z[i : i + 1], return_dict=False)[0] for i in range(len(z))])  # [B, 3, F, H, W]
        return frames_first((x.float() / 2 + 0.5).clamp(0, 1))


def marker_num_frames(path: str | os.PathLike) -> int | None:
    """``num_frames`` recorded in a tiny model's marker JSON (:data:`~flowgrpo.models.tiny.TINY_MARKER`), or None."""
    marker = Path(path) / TINY_MARKER
    if not marker.is_file():
        return None
    value = json.loads(marker.read_text()).get("num_frames")
    return int(value) if value else None


__all__ = ["DEFAULT_NUM_FRAMES", "WAN_FFN_LORA_TARGETS", "WAN_LORA_TARGETS", "WanAdapter", "frames_first",
           "marker_num_frames", "wan_sigmas"]
