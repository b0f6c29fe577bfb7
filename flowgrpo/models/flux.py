"""FLUX.1 adapter: :class:`~flowgrpo.models.base.ModelAdapter` over diffusers' ``FluxPipeline``.

Latent layout
    FLUX's transformer works on *packed* latents: every 2x2 patch of the 16-channel VAE latent becomes one token of
    64 features, ``[B, C, H, W] -> [B, (H/2)(W/2), 4C]``, with 3-d rotary position ids per token (``img_ids``: 0,
    row, column) and all-zero ids for the text tokens (``txt_ids``). The rollout, the SDE math and the loss keep
    working on unpacked ``[B, C, H, W]`` latents (``latent_shape`` is the unpacked shape, so initial noise, log-probs
    and KL are those of the unpacked tensor — packing is a permutation, so per-element means are unchanged);
    :meth:`FluxAdapter.velocity` packs on the way in and unpacks on the way out.

Timestep convention
    ``FluxPipeline`` feeds the transformer ``timestep = scheduler_timestep / 1000`` (the transformer multiplies by
    1000 itself), i.e. ``sigma``. We pass ``sigma`` directly.

Guidance
    FLUX.1-dev is guidance-distilled: the guidance scale is an *input* (``guidance`` embedding, transformer config
    ``guidance_embeds``), one transformer call on B rows, no negative prompt. That is the default here:
    ``velocity(..., guidance_scale)`` sends ``guidance_scale`` to the embedding and ignores ``negative``.
    True classifier-free guidance only when the adapter is built with ``true_cfg=True``: then ``guidance_scale > 1``
    is the CFG weight, one call on the 2B batch [negative; positive] as for SD3, and the embedding gets
    ``embedded_guidance``. Models without ``guidance_embeds`` (FLUX.1-schnell) ignore the scale unless ``true_cfg``.

Schedule
    FLUX shifts its sigmas by ``mu``, a linear function of the image token count (``calculate_shift`` in the
    pipeline: 0.5 at 256 tokens, 1.15 at 4096 tokens). The protocol's ``sigmas(num_steps)`` is a function of the
    step count only, so the adapter holds the image size it samples at in :attr:`FluxAdapter.resolution` (default: the
    VAE config's ``sample_size``, 1024 for FLUX.1-dev, 64 for the tiny model); set it to ``sample.resolution``
    before asking for sigmas. ``latent_shape`` warns when asked for another resolution.

Precision: see :class:`~flowgrpo.models.common.DiffusersAdapterBase` (fp32 master weights + autocast, as upstream
Flow-GRPO's FLUX trainer; ``transformer_dtype=torch.bfloat16`` keeps the frozen LoRA base in bf16 to halve memory).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .base import Conditioning, guided
from .common import DiffusersAdapterBase, compute_dtype, dtype_kwarg

if TYPE_CHECKING:
    from diffusers import FluxPipeline

#: default LoRA targets, as upstream Flow-GRPO's FLUX trainer: the attention projections and feed-forwards of the
#: double-stream blocks (image and text stream). The ``attn.to_q/k/v`` suffixes also match the single-stream
#: blocks' q/k/v projections (their attention has no ``to_out``: the block's ``proj_out`` mixes attention and MLP).
FLUX_LORA_TARGETS: list[str] = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


# ------------------------------------------------------------------------------------------------ latent layout


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: token (i, j) holds the 2x2 patch at rows 2i..2i+1, columns 2j..2j+1,
    features ordered (channel, dy, dx) — FLUX's packing."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 patches: latent height/width must be even, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)  # [B, C, h', dy, w', dx]
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: [B, (H/2)(W/2), 4C] -> [B, C, H, W] (``height``/``width`` in latent
    pixels)."""
    b, n, f = packed.shape
    if n != (height // 2) * (width // 2) or f % 4:
        raise ValueError(f"packed latents {tuple(packed.shape)} do not match a {height}x{width} latent")
    x = packed.reshape(b, height // 2, width // 2, f // 4, 2, 2)  # [B, h', w', C, dy, dx]
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, f // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotary position ids of the packed image tokens, [(H/2)(W/2), 3]: (0, token row, token column), row-major
    (``height``/``width`` in latent pixels)."""
    rows = torch.arange(height // 2, dtype=dtype).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, dtype=dtype).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(device)


def dynamic_shift_mu(image_seq_len: int, scheduler_config: Any) -> float:
    """FLUX's resolution-dependent shift: linear in the image token count between (base_image_seq_len, base_shift)
    and (max_image_seq_len, max_shift) of the scheduler config (defaults: (256, 0.5) and (4096, 1.15))."""
    get = scheduler_config.get
    x0, x1 = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    y0, y1 = get("base_shift", 0.5), get("max_shift", 1.15)
    return y0 + (image_seq_len - x0) * (y1 - y0) / (x1 - x0)


class PackedGeometry:
    """Square images as 2x2-packed latent tokens, with a sigma shift that depends on the token count (FLUX's
    ``use_dynamic_shifting``; Qwen-Image uses the same convention). Needs ``pipe`` (VAE + scheduler),
    ``vae_scale_factor``, ``latent_channels`` and :attr:`display_name`; call :meth:`_init_geometry` in the constructor.

    The protocol's ``sigmas(num_steps)`` is a function of the step count only, so the adapter holds the image size it
    samples at in :attr:`resolution` (settable; the recipe sets it to ``sample.resolution``); ``latent_shape`` warns
    when asked for another size."""

    #: the family's name in messages
    display_name = "FLUX"

    def _init_geometry(self, resolution: int) -> None:
        self._sigmas: dict[tuple[int, int], torch.Tensor] = {}
        self._warned: set[int] = set()
        self._resolution = 0
        self.resolution = int(resolution)

    @property
    def _multiple(self) -> int:
        return self.vae_scale_factor * 2  # VAE downsampling x 2x2 packing

    @property
    def resolution(self) -> int:
        """Square image size (pixels) the sigma schedule is computed for (the shift depends on it)."""
        return self._resolution

    @resolution.setter
    def resolution(self, value: int) -> None:
        value = int(value)
        self._check_resolution(value)
        self._resolution = value

    def _check_resolution(self, resolution: int) -> None:
        if resolution <= 0 or resolution % self._multiple:
            raise ValueError(f"resolution {resolution} must be a positive multiple of {self._multiple} for "
                             f"{self.display_name} (VAE factor {self.vae_scale_factor} x 2x2 packing)")

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """Unpacked (C, res/8, res/8) (C = 16 for FLUX.1 and Qwen-Image); ``resolution`` must be a multiple of 16."""
        self._check_resolution(resolution)
        if resolution != self._resolution and resolution not in self._warned and self._dynamic_shift:
            self._warned.add(resolution)
            warnings.warn(
                f"{self.display_name} sigmas are computed for resolution {self._resolution} but latents are "
                f"requested for {resolution}: set adapter.resolution = {resolution} before calling sigmas() to get "
                "the resolution-dependent shift for that size", stacklevel=2)
        side = resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)

    def image_seq_len(self, resolution: int | None = None) -> int:
        """Number of packed image tokens of a square image (default: :attr:`resolution`)."""
        res = self._resolution if resolution is None else int(resolution)
        return (res // self._multiple) ** 2

    def mu(self, resolution: int | None = None) -> float:
        """The dynamic shift for a square image (default: :attr:`resolution`)."""
        return dynamic_shift_mu(self.image_seq_len(resolution), self.pipe.scheduler.config)

    @property
    def _dynamic_shift(self) -> bool:
        return bool(self.pipe.scheduler.config.get("use_dynamic_shifting", False))

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """fp32 [num_steps + 1] on CPU: exactly what the pipeline sets on its scheduler for ``num_steps`` at
        :attr:`resolution` (base sigmas ``linspace(1, 1/T, T)`` shifted with ``mu(resolution)``, stretched to the
        config's ``shift_terminal`` if any, trailing 0), from a fresh scheduler copy so the pipeline's scheduler
        state is never touched."""
        import numpy as np

        key = (int(num_steps), self._resolution)
        if key not in self._sigmas:
            sched_cfg = self.pipe.scheduler.config
            sched = type(self.pipe.scheduler).from_config(sched_cfg)
            if sched_cfg.get("use_flow_sigmas", False):
                sched.set_timesteps(num_steps, device="cpu", mu=self.mu())
            else:
                base = np.linspace(1.0, 1.0 / num_steps, num_steps)
                sched.set_timesteps(sigmas=base, device="cpu", mu=self.mu())
            self._sigmas[key] = sched.sigmas.to(torch.float32).clone()
        return self._sigmas[key].clone()


# ------------------------------------------------------------------------------------------------------ adapter


class FluxAdapter(PackedGeometry, DiffusersAdapterBase):
    """FLUX.1 adapter. Build with :meth:`from_pretrained` (a diffusers directory) or :meth:`from_pipeline`.

    Beyond the protocol: ``resolution`` (the image size ``sigmas`` is computed for; settable), ``true_cfg`` and
    ``embedded_guidance`` (see the module docstring), ``guidance_embeds`` (whether the transformer takes a guidance
    input), ``image_seq_len(resolution)`` and ``mu(resolution)``.
    """

    family = "flux"
    #: the diffusers pipeline class :meth:`from_pretrained` loads
    pipeline_class = "FluxPipeline"
    default_lora_targets = tuple(FLUX_LORA_TARGETS)
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(
        self,
        pipe: "FluxPipeline",
        device: str | torch.device = "cpu",
        mixed_precision: str = "no",
        max_sequence_length: int = 512,
        full_finetune: bool = False,
        needs_reference: bool = True,
        resolution: int | None = None,
        true_cfg: bool = False,
        embedded_guidance: float = 1.0,
        transformer_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(pipe, device=device, mixed_precision=mixed_precision, full_finetune=full_finetune,
                         needs_reference=needs_reference, transformer_dtype=transformer_dtype)
        cfg = self.transformer.config
        if int(getattr(cfg, "patch_size", 1)) != 1:
            raise NotImplementedError(f"FLUX transformers with patch_size={cfg.patch_size} are not supported")
        self.max_sequence_length = int(max_sequence_length)
        self.latent_channels = int(cfg.in_channels) // 4
        self.guidance_embeds = bool(getattr(cfg, "guidance_embeds", False))
        self.true_cfg = bool(true_cfg)
        self.embedded_guidance = float(embedded_guidance)
        vae_cfg = pipe.vae.config
        self.scaling_factor = float(vae_cfg.scaling_factor)
        self.shift_factor = float(getattr(vae_cfg, "shift_factor", None) or 0.0)
        self.vae_scale_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        self._img_ids: dict[tuple[int, int], torch.Tensor] = {}
        self._init_geometry(resolution if resolution is not None else self._default_resolution())

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pipeline(cls, pipe: "FluxPipeline", **kwargs: Any) -> "FluxAdapter":
        """Wrap an in-memory pipeline (its modules are moved/cast in place); kwargs as for the constructor."""
        return cls(pipe, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu", mixed_precision: str = "no",
                        **kwargs: Any) -> "FluxAdapter":
        """Load a local diffusers-format FLUX directory. On CUDA with mixed precision the text encoders are loaded
        directly in the compute dtype (T5-XXL in fp32 would need ~19 GB), the transformer in ``transformer_dtype``
        (default fp32 master weights), the VAE in fp32."""
        import diffusers

        dtype = compute_dtype(mixed_precision)
        torch_dtype: Any = torch.float32
        if dtype is not None and torch.device(device).type == "cuda":
            tdtype = kwargs.get("transformer_dtype", torch.float32)
            torch_dtype = {"transformer": tdtype, "vae": torch.float32, "default": dtype}
        pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(str(path), **{dtype_kwarg(): torch_dtype})
        return cls(pipe, device=device, mixed_precision=mixed_precision, **kwargs)

    # ---------------------------------------------------------------------------------------------- geometry

    @property
    def needs_negative(self) -> bool:
        """Whether guidance_scale > 1 uses a negative conditioning (true CFG only; distilled guidance does not)."""
        return self.true_cfg

    def _default_resolution(self) -> int:
        size = getattr(self.pipe.vae.config, "sample_size", None)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) if size and int(size) % self._multiple == 0 else 1024

    # ------------------------------------------------------------------------------------------------- text

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """{"prompt_embeds": fp32 [B, max_sequence_length, T5 dim] (T5 sequence), "pooled_prompt_embeds": fp32
        [B, CLIP dim] (CLIP pooled output)}. FLUX's text position ids are all zero, [L, 3]: built in
        :meth:`velocity` from L, not stored per row."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        pe, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": pe.float(), "pooled_prompt_embeds": pooled.float()}

    # --------------------------------------------------------------------------------------------- velocity

    def _image_ids(self, height: int, width: int) -> torch.Tensor:
        key = (height, width)
        if key not in self._img_ids:
            self._img_ids[key] = latent_image_ids(height, width, device=self.device)
        return self._img_ids[key]

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance_scale: float,
        negative: Conditioning | None = None,
        model: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """v(x_t, sigma), fp32 [B, C, H, W] for unpacked latents [B, C, H, W].

        Default (distilled guidance): ONE transformer call on B rows with ``guidance = guidance_scale`` (when the
        transformer has ``guidance_embeds``); ``negative`` is ignored. ``true_cfg=True`` and guidance_scale > 1:
        ONE call on [negative; positive] (2B rows), v = v_u + w (v_c - v_u), embedding = ``embedded_guidance``.
        A 1-row ``negative`` is broadcast."""
        h, w = latents.shape[-2:]
        cfg = self.true_cfg and guidance_scale > 1.0
        x, s, c = self._velocity_inputs(latents, sigma, cond, negative, cfg)  # [N, C, H, W], [N], N = B or 2B
        n = x.shape[0]
        guidance = None
        if self.guidance_embeds:
            g = self.embedded_guidance if self.true_cfg else float(guidance_scale)
            guidance = torch.full((n,), g, dtype=torch.float32, device=self.device)
        txt_ids = torch.zeros(c["prompt_embeds"].shape[1], 3, dtype=torch.float32, device=self.device)
        tokens, ids = pack_latents(x), self._image_ids(h, w)  # [N, (H/2)(W/2), 4C], [(H/2)(W/2), 3]
        n_img = tokens.shape[1]
        extra = self._extra_tokens(c)
        if extra is not None:  # e.g. Kontext's source image: more tokens after the noisy ones
            tokens, ids = torch.cat([tokens, extra[0].to(tokens)], dim=1), torch.cat([ids, extra[1]], dim=0)
        net = self._network(model)
        with self._autocast():
            out = net(
                hidden_states=tokens,
                encoder_hidden_states=c["prompt_embeds"],
                pooled_projections=c["pooled_prompt_embeds"],
                timestep=s,
                img_ids=ids,
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
        out = unpack_latents(out[:, :n_img].float(), h, w)  # [N, C, H, W]: the noisy tokens' velocity
        return guided(out, guidance_scale) if cfg else out

    def _extra_tokens(self, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Conditioning tokens appended after the noisy image tokens, with their position ids ([N, M, 4C], [M, 3]);
        None for text-to-image FLUX. The velocity is read on the noisy tokens only."""
        return None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents [B, 16, h, w] -> fp32 images [B, 3, 8h, 8w] in [0, 1] (z / scaling + shift, VAE)."""
        vae = self.pipe.vae
        z = latents.to(self.device, vae.dtype) / self.scaling_factor + self.shift_factor
        x = vae.decode(z, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)


__all__ = ["FLUX_LORA_TARGETS", "FluxAdapter", "PackedGeometry", "dynamic_shift_mu", "latent_image_ids",
           "pack_latents", "unpack_latents"]
