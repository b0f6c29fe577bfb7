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

import contextlib
import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .base import Conditioning, concat

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

_DTYPES: dict[str, torch.dtype | None] = {"no": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
#: our ``init`` names -> peft ``init_lora_weights`` (other strings, e.g. "pissa", are passed to peft unchanged)
_LORA_INIT: dict[str, Any] = {"gaussian": "gaussian", "default": True, "kaiming": True, "random": False}


def _compute_dtype(mixed_precision: str) -> torch.dtype | None:
    try:
        return _DTYPES[mixed_precision]
    except KeyError:
        raise ValueError(f"mixed_precision must be one of {sorted(_DTYPES)}, got {mixed_precision!r}") from None


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` to ``device``; cast only if some parameter has another dtype (diffusers warns on every
    ``.to(dtype)``)."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


def _dtype_kwarg() -> str:
    """diffusers renamed ``from_pretrained(torch_dtype=)`` to ``dtype=`` (the old name is deprecated)."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


class SD3Adapter:
    """SD3 adapter. Build with :meth:`from_pretrained` (a diffusers directory) or :meth:`from_pipeline`.

    Attributes: ``pipe`` (the pipeline, holding the frozen VAE/text encoders), ``transformer`` (the unwrapped
    policy network), ``lora_config`` (peft ``LoraConfig`` or None), ``device``, ``dtype`` (autocast dtype or None).

    Full fine-tuning (``full_finetune=True``): the whole transformer is trainable. With ``needs_reference=True``
    (the default) a frozen deep copy of the *initial* transformer is taken at construction (taking it lazily
    would capture already-trained weights) and :meth:`reference` switches ``velocity`` to it. Pass
    ``needs_reference=False`` when the KL term is off to save the memory; :meth:`reference` then raises.
    """

    family = "sd3"

    def __init__(
        self,
        pipe: "StableDiffusion3Pipeline",
        device: str | torch.device = "cpu",
        mixed_precision: str = "no",
        max_sequence_length: int = 128,
        full_finetune: bool = False,
        needs_reference: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = _compute_dtype(mixed_precision)
        self.mixed_precision = mixed_precision
        self.max_sequence_length = int(max_sequence_length)
        self.full_finetune = bool(full_finetune)
        self.pipe = pipe
        self.lora_config: Any = None  # peft.LoraConfig once add_lora() ran
        self._in_reference = False
        self._sigmas: dict[int, torch.Tensor] = {}

        te_dtype = self.dtype if (self.dtype is not None and self.device.type == "cuda") else torch.float32
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            te = getattr(pipe, name, None)
            if te is not None:
                _place(te, self.device, te_dtype).eval().requires_grad_(False)
        _place(pipe.vae, self.device, torch.float32).eval().requires_grad_(False)
        self.transformer: torch.nn.Module = _place(pipe.transformer, self.device, torch.float32).eval()
        self.transformer.requires_grad_(self.full_finetune)

        self._ref_transformer: torch.nn.Module | None = None
        if self.full_finetune and needs_reference:
            self._ref_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()

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

        dtype = _compute_dtype(mixed_precision)
        torch_dtype: Any = torch.float32
        if dtype is not None and torch.device(device).type == "cuda":
            torch_dtype = {"transformer": torch.float32, "vae": torch.float32, "default": dtype}
        pipe = StableDiffusion3Pipeline.from_pretrained(str(path), **{_dtype_kwarg(): torch_dtype})
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

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _network(self, model: Callable[..., Any] | None) -> Callable[..., Any]:
        if self._in_reference and self._ref_transformer is not None:
            return self._ref_transformer  # full fine-tune reference: the frozen initial copy, never wrapped
        return model if model is not None else self.transformer

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
        b = latents.shape[0]
        x = latents.to(self.device, torch.float32)  # [B, C, H, W]
        s = torch.as_tensor(sigma).to(self.device, torch.float32).reshape(-1).expand(b)  # [B]
        cfg = guidance_scale > 1.0
        c = {k: v.to(self.device) for k, v in cond.items()}
        if cfg:
            if negative is None:
                raise ValueError(f"guidance_scale={guidance_scale} > 1 needs the negative conditioning")
            neg = {k: (t.expand(b, *t.shape[1:]) if len(t) == 1 else t).to(self.device) for k, t in negative.items()}
            x, s, c = torch.cat([x, x]), torch.cat([s, s]), concat([neg, c])  # [2B, ...]
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
        if not cfg:
            return out
        v_u, v_c = out.chunk(2)  # [B, ...] each
        return v_u + guidance_scale * (v_c - v_u)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 16, h, w] -> fp32 images [B, 3, 8h, 8w] in [0, 1]."""
        vae = self.pipe.vae
        z = latents.to(self.device, vae.dtype) / self.scaling_factor + self.shift_factor
        x = vae.decode(z, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------------------------------------ LoRA

    def add_lora(
        self,
        rank: int,
        alpha: int,
        target_modules: Sequence[str] = tuple(SD3_LORA_TARGETS),
        init: str = "gaussian",
    ) -> None:
        """Inject a peft LoRA adapter ("default") into the transformer; freezes everything else.
        ``init``: "gaussian" (peft gaussian A, zero B: the output is unchanged at init), "default"/"kaiming",
        "random" (B not zero), or any other peft ``init_lora_weights`` string."""
        from peft import LoraConfig

        if self.full_finetune:
            raise RuntimeError("add_lora() is incompatible with full_finetune=True")
        if self.lora_config is not None:
            raise RuntimeError("a LoRA adapter is already attached")
        config = LoraConfig(
            r=int(rank),
            lora_alpha=alpha,
            target_modules=list(target_modules),
            init_lora_weights=_LORA_INIT.get(init, init),
        )
        self.transformer.add_adapter(config)
        self.lora_config = config
        for n, p in self.transformer.named_parameters():
            p.requires_grad_(self._is_lora(n))
        if not any(self._is_lora(n) for n, _ in self.transformer.named_parameters()):
            raise ValueError(f"no transformer module matched the LoRA targets {list(target_modules)}")

    @staticmethod
    def _is_lora(name: str) -> bool:
        return ".lora_" in name

    def _trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        if self.lora_config is not None:
            return [(n, p) for n, p in self.transformer.named_parameters() if self._is_lora(n)]
        if self.full_finetune:
            return list(self.transformer.named_parameters())
        raise RuntimeError("nothing is trainable: call add_lora() or build the adapter with full_finetune=True")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """LoRA weights after :meth:`add_lora`, else (full_finetune=True) every transformer parameter."""
        return [p for _, p in self._trainable_named()]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside, ``velocity`` computes the reference (initial) policy: LoRA adapters disabled on the unwrapped
        ``self.transformer`` (so a DDP/DeepSpeed wrapper passed as ``model=`` sees it too), or the frozen initial
        copy for full fine-tuning (``model=`` is then ignored). Use under ``torch.no_grad()``."""
        if self.lora_config is not None:
            flags = [p.requires_grad for p in self.transformer.parameters()]  # peft toggles requires_grad
            self.transformer.disable_adapters()
            self._in_reference = True
            try:
                yield
            finally:
                self._in_reference = False
                self.transformer.enable_adapters()
                for p, f in zip(self.transformer.parameters(), flags):
                    p.requires_grad_(f)
        elif self.full_finetune:
            if self._ref_transformer is None:
                raise RuntimeError("no reference copy: the adapter was built with needs_reference=False")
            self._in_reference = True
            try:
                yield
            finally:
                self._in_reference = False
        else:  # nothing trained: the policy is the reference
            yield

    # ----------------------------------------------------------------------------------------- checkpoints

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """{param name: CPU fp32 clone} of the trainable parameters (names as in ``transformer.named_parameters``,
        e.g. ``transformer_blocks.0.attn.to_q.lora_A.default.weight``)."""
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in self._trainable_named()}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the trainable parameters; the key sets and shapes must match exactly."""
        params = dict(self._trainable_named())
        missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        if missing or unexpected:
            raise KeyError(f"trainable state mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
        for n, p in params.items():
            if tuple(state[n].shape) != tuple(p.shape):
                raise ValueError(f"shape mismatch for {n}: {tuple(state[n].shape)} vs {tuple(p.shape)}")
            p.copy_(state[n].to(p.device, p.dtype))

    @torch.no_grad()
    def _merged_transformer(self) -> torch.nn.Module:
        """A plain SD3 transformer whose weights are base + LoRA delta. Built on the meta device and filled with
        ``assign=True``: unmerged tensors are shared with ``self.transformer`` (no copy), only the targeted
        weights are new; ``self.transformer`` is not modified."""
        from peft.tuners.lora import LoraLayer

        base = self.transformer
        state: dict[str, torch.Tensor] = {}
        for name, t in base.state_dict().items():
            if ".lora_" not in name:
                state[name.replace(".base_layer.", ".")] = t
        for mod_name, mod in base.named_modules():
            if not isinstance(mod, LoraLayer):
                continue
            weight = mod.get_base_layer().weight
            if getattr(mod, "use_dora", {}).get("default", False):
                raise NotImplementedError("merging DoRA adapters is not supported")
            delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters if a in mod.lora_A)
            state[f"{mod_name}.weight"] = (weight + delta).to(weight.dtype)
        with torch.device("meta"):
            merged = type(base).from_config(base.config)
        merged.load_state_dict(state, strict=True, assign=True)
        leftover = [n for n, t in [*merged.named_parameters(), *merged.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"merged transformer has unfilled tensors: {leftover[:5]}")
        return merged.eval()

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write a complete diffusers-format pipeline directory with the LoRA merged into the transformer weights
        (the in-memory model stays unmerged and trainable). With LoRA, ``out_dir/lora/`` additionally holds
        ``pytorch_lora_weights.safetensors`` (diffusers format, lora_alpha kept in its metadata, loadable with
        ``pipe.load_lora_weights``) and the peft ``adapter_config.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        transformer = self._merged_transformer() if self.lora_config is not None else self.transformer
        pipe_cls = type(self.pipe)
        pipe = pipe_cls(**{**self.pipe.components, "transformer": transformer})
        pipe.save_pretrained(str(out), safe_serialization=True)
        if self.lora_config is not None:
            from peft.utils import get_peft_model_state_dict

            lora_dir = out / "lora"
            lora_state = {k: v.detach().to("cpu", torch.float32).contiguous()
                          for k, v in get_peft_model_state_dict(self.transformer).items()}
            pipe_cls.save_lora_weights(
                str(lora_dir),
                transformer_lora_layers=lora_state,
                transformer_lora_adapter_metadata=self.lora_config.to_dict(),
            )
            self.lora_config.save_pretrained(str(lora_dir))


__all__ = ["SD3Adapter", "SD3_LORA_TARGETS"]
