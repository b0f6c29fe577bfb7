"""What every diffusers-based adapter shares: the precision policy helpers, and :class:`DiffusersAdapterBase` with
the LoRA / full fine-tune machinery, the reference-policy context, trainable-state checkpoints and the merged
diffusers export.

A family adapter (SD3, FLUX, ...) subclasses :class:`DiffusersAdapterBase`, calls its constructor with the
pipeline, sets ``family``, ``default_lora_targets`` and ``text_encoder_names``, and implements the family-specific
half of :class:`~flowgrpo.models.base.ModelAdapter`: ``latent_shape``, ``sigmas``, ``encode_prompts``, ``velocity``
(inputs from ``self._velocity_inputs``, ``self._network(model)`` called under ``self._autocast()``, CFG halves
combined with :func:`~flowgrpo.models.base.guided`) and ``decode``.

diffusers/peft are imported lazily.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .base import Conditioning, broadcast_rows

_DTYPES: dict[str, torch.dtype | None] = {"no": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
#: our ``init`` names -> peft ``init_lora_weights`` (other strings, e.g. "pissa", are passed to peft unchanged)
LORA_INIT: dict[str, Any] = {"gaussian": "gaussian", "default": True, "kaiming": True, "random": False}


def compute_dtype(mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``mixed_precision`` setting ("no"/"fp32" -> None)."""
    try:
        return _DTYPES[mixed_precision]
    except KeyError:
        raise ValueError(f"mixed_precision must be one of {sorted(_DTYPES)}, got {mixed_precision!r}") from None


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` to ``device``; cast only if some parameter has another dtype (diffusers warns on every
    ``.to(dtype)``)."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


def dtype_kwarg() -> str:
    """diffusers renamed ``from_pretrained(torch_dtype=)`` to ``dtype=`` (the old name is deprecated)."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


def is_lora(name: str) -> bool:
    """Whether a ``named_parameters`` name belongs to a peft LoRA matrix."""
    return ".lora_" in name


class DiffusersAdapterBase:
    """Shared half of a diffusers-pipeline adapter.

    Attributes: ``pipe`` (the pipeline, holding the frozen VAE/text encoders), ``transformer`` (the unwrapped policy
    network), ``lora_config`` (peft ``LoraConfig`` or None), ``device``, ``dtype`` (autocast dtype or None),
    ``mixed_precision``, ``full_finetune``.

    Precision: VAE frozen in fp32; text encoders frozen, in the mixed-precision dtype on CUDA, fp32 elsewhere;
    transformer in ``transformer_dtype`` (fp32 master weights by default), every transformer call under
    ``torch.autocast`` when mixed precision is on, so sampling, training and reference forwards are bit-identical
    computations. LoRA weights are always fp32.

    Full fine-tuning (``full_finetune=True``): the whole transformer is trainable. With ``needs_reference=True`` a
    frozen deep copy of the *initial* transformer is taken at construction and :meth:`reference` switches to it;
    ``needs_reference=False`` saves the memory (then :meth:`reference` raises).
    """

    family: str = ""
    #: LoRA targets used when ``add_lora`` gets no ``target_modules``
    default_lora_targets: tuple[str, ...] = ()
    #: pipeline attributes holding the (frozen) text encoders
    text_encoder_names: tuple[str, ...] = ()

    def __init__(
        self,
        pipe: Any,
        device: str | torch.device = "cpu",
        mixed_precision: str = "no",
        full_finetune: bool = False,
        needs_reference: bool = True,
        transformer_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = compute_dtype(mixed_precision)
        self.mixed_precision = mixed_precision
        self.full_finetune = bool(full_finetune)
        if self.full_finetune and transformer_dtype != torch.float32:
            raise ValueError(f"full fine-tuning needs fp32 master weights, got transformer_dtype={transformer_dtype}")
        self.pipe = pipe
        self.lora_config: Any = None  # peft.LoraConfig once add_lora() ran
        self._in_reference = False

        te_dtype = self.dtype if (self.dtype is not None and self.device.type == "cuda") else torch.float32
        for name in self.text_encoder_names:
            te = getattr(pipe, name, None)
            if te is not None:
                place(te, self.device, te_dtype).eval().requires_grad_(False)
        place(pipe.vae, self.device, torch.float32).eval().requires_grad_(False)
        self.transformer: torch.nn.Module = place(pipe.transformer, self.device, transformer_dtype).eval()
        self.transformer.requires_grad_(self.full_finetune)

        self._ref_transformer: torch.nn.Module | None = None
        if self.full_finetune and needs_reference:
            self._ref_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()

    # --------------------------------------------------------------------------------------------- forward

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _velocity_inputs(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                         negative: Conditioning | None, cfg: bool) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """The inputs of ONE transformer call, on the device: fp32 latents, sigmas [N] and the conditioning rows.
        Without ``cfg`` N = B; with it N = 2B rows [negative; positive] (:meth:`_negative_rows`), and the caller
        combines the two halves of the output (:func:`~flowgrpo.models.base.guided`)."""
        b = latents.shape[0]
        x = latents.to(self.device, torch.float32)  # [B, C, (F,) H, W]
        s = torch.as_tensor(sigma).to(self.device, torch.float32).reshape(-1).expand(b)  # [B]
        c = {k: v.to(self.device) for k, v in cond.items()}
        if not cfg:
            return x, s, c
        if negative is None:
            raise ValueError("classifier-free guidance (guidance_scale > 1) needs the negative conditioning")
        neg = self._negative_rows(negative, c, b)
        return torch.cat([x, x]), torch.cat([s, s]), {k: torch.cat([neg[k], c[k]]) for k in c}  # [2B, ...]

    def _negative_rows(self, negative: Conditioning, cond: Conditioning, batch: int) -> Conditioning:
        """The negative conditioning as ``batch`` rows (a 1-row one is broadcast) with every key of ``cond``."""
        neg = broadcast_rows(negative, batch, self.device)
        missing = set(cond) - set(neg)
        if missing:
            raise KeyError(f"negative conditioning lacks {sorted(missing)}")
        return neg

    def _network(self, model: Callable[..., Any] | None) -> Callable[..., Any]:
        """The module a velocity call runs: the frozen initial copy inside :meth:`reference` for full fine-tuning
        (never wrapped), else ``model`` (e.g. the DDP/DeepSpeed wrapper) or the unwrapped transformer."""
        if self._in_reference and self._ref_transformer is not None:
            return self._ref_transformer
        return model if model is not None else self.transformer

    # ------------------------------------------------------------------------------------------------ LoRA

    def add_lora(
        self,
        rank: int,
        alpha: int,
        target_modules: Sequence[str] | None = None,
        init: str = "gaussian",
    ) -> None:
        """Inject a peft LoRA adapter ("default") into the transformer (``target_modules`` default: the family's
        :attr:`default_lora_targets`); freezes everything else; LoRA weights are fp32.
        ``init``: "gaussian" (peft gaussian A, zero B: the output is unchanged at init), "default"/"kaiming",
        "random" (B not zero), or any other peft ``init_lora_weights`` string."""
        from peft import LoraConfig

        if self.full_finetune:
            raise RuntimeError("add_lora() is incompatible with full_finetune=True")
        if self.lora_config is not None:
            raise RuntimeError("a LoRA adapter is already attached")
        targets = list(self.default_lora_targets if target_modules is None else target_modules)
        config = LoraConfig(
            r=int(rank),
            lora_alpha=alpha,
            target_modules=targets,
            init_lora_weights=LORA_INIT.get(init, init),
        )
        self.transformer.add_adapter(config)
        self.lora_config = config
        for n, p in self.transformer.named_parameters():
            p.requires_grad_(is_lora(n))
            if is_lora(n) and p.dtype != torch.float32:  # peft follows the base layer's dtype
                p.data = p.data.float()
        if not any(is_lora(n) for n, _ in self.transformer.named_parameters()):
            raise ValueError(f"no transformer module matched the LoRA targets {targets}")

    def _trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        if self.lora_config is not None:
            return [(n, p) for n, p in self.transformer.named_parameters() if is_lora(n)]
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
        """A plain transformer (same class and config) whose weights are base + LoRA delta. Built on the meta device
        and filled with ``assign=True``: unmerged tensors (and non-persistent buffers) are shared with
        ``self.transformer`` (no copy), only the targeted weights are new (in the base weight's dtype);
        ``self.transformer`` is not modified."""
        from peft.tuners.lora import LoraLayer

        base = self.transformer
        state: dict[str, torch.Tensor] = {}
        for name, t in base.state_dict().items():
            if not is_lora(name):
                state[name.replace(".base_layer.", ".")] = t
        for mod_name, mod in base.named_modules():
            if not isinstance(mod, LoraLayer):
                continue
            weight = mod.get_base_layer().weight
            if getattr(mod, "use_dora", {}).get("default", False):
                raise NotImplementedError("merging DoRA adapters is not supported")
            delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters if a in mod.lora_A)
            state[f"{mod_name}.weight"] = (weight.float() + delta.float()).to(weight.dtype)
        with torch.device("meta"):
            merged = type(base).from_config(base.config)
        merged.load_state_dict(state, strict=True, assign=True)
        for name, buf in base.named_buffers():  # non-persistent buffers (e.g. Wan's rotary tables) are not in
            owner, _, leaf = name.replace(".base_layer.", ".").rpartition(".")  # state_dict: share the base's
            module = merged.get_submodule(owner)
            if getattr(module, leaf) is not None and getattr(module, leaf).is_meta:
                module.register_buffer(leaf, buf, persistent=False)
        leftover = [n for n, t in [*merged.named_parameters(), *merged.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"merged transformer has unfilled tensors: {leftover[:5]}")
        return merged.eval()

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write a complete diffusers-format pipeline directory (the pipeline's own class) with the LoRA merged into
        the transformer weights (the in-memory model stays unmerged and trainable). With LoRA, ``out_dir/lora/``
        additionally holds ``pytorch_lora_weights.safetensors`` (diffusers format, lora_alpha kept in its metadata,
        loadable with ``pipe.load_lora_weights``) and the peft ``adapter_config.json``."""
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


__all__ = ["DiffusersAdapterBase", "LORA_INIT", "compute_dtype", "dtype_kwarg", "is_lora", "place"]
