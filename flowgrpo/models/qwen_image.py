"""Qwen-Image adapter: :class:`~flowgrpo.models.base.ModelAdapter` over diffusers' ``QwenImagePipeline``.

Text encoding
    The prompt is wrapped in Qwen-Image's chat template (``pipe.prompt_template_encode``) and run through the
    Qwen2.5-VL language model; the last hidden states of the valid tokens are kept, minus the template's system
    prefix (``prompt_template_encode_start_idx`` = 34 tokens), truncated to ``max_sequence_length``. Prompts give
    sequences of different lengths: :meth:`QwenImageAdapter.encode_prompts` right-pads every row with zeros to the fixed
    length ``max_sequence_length`` and returns the mask (``prompt_embeds_mask``, 1 = valid token), so conditioning rows
    of different calls can be indexed and concatenated. The transformer masks the padded keys, so padding never
    changes the image tokens' output; :meth:`~QwenImageAdapter.velocity` drops the columns that are padding in every
    row of the call (as upstream's trainer: less attention work) and passes no mask when nothing is left to mask (as
    the pipeline).

Latent layout
    The VAE (``AutoencoderKLQwenImage``, Wan-style causal 3-d convolutions) works on videos ``[B, C, F, H, W]``; an
    image is one frame. Latents are normalised per channel with the VAE config's ``latents_mean``/``latents_std``
    (not a scalar scaling factor). The transformer sees 2x2-packed tokens exactly as FLUX (``[B, C, H, W] ->
    [B, (H/2)(W/2), 4C]``) with rotary positions built from ``img_shapes = [(1, H/2, W/2)]`` per row. As for FLUX,
    the rollout works on unpacked ``[B, C, H, W]`` latents (``latent_shape`` is the unpacked shape without the frame
    dim); :meth:`~QwenImageAdapter.velocity` packs and unpacks, :meth:`~QwenImageAdapter.decode` adds the frame dim.

Timestep convention
    ``QwenImagePipeline`` feeds ``timestep / 1000`` (= sigma) to the transformer, which scales by 1000 itself. We
    pass ``sigma``.

Guidance
    Qwen-Image has no distilled guidance (``guidance_embeds`` is False): guidance_scale > 1 is *true* CFG on the 2B
    batch [negative; positive], ``v = v_u + w (v_c - v_u)``, followed by the pipeline's norm rescaling: every packed
    token's combined velocity is rescaled to the norm of its conditional velocity, ``v * |v_c| / |v|`` (norms over
    the 4C features of a token). Upstream Flow-GRPO samples and trains Qwen-Image with this CFG (scale 4, negative
    prompt " ").

Schedule
    Dynamic shift like FLUX (``mu`` linear in the image token count, Qwen's config: 0.5 at 256 tokens, 0.9 at 8192,
    exponential time shift) plus ``shift_terminal = 0.02`` (the last non-zero sigma is stretched to 0.02): the
    adapter asks a fresh copy of the pipeline's scheduler for the sigmas, exactly as the pipeline sets them, at
    :attr:`QwenImageAdapter.resolution` (the recipe sets it from ``sample.resolution``).

Precision: see :class:`~flowgrpo.models.common.DiffusersAdapterBase` (fp32 master weights + autocast; upstream trains
Qwen-Image in bf16; ``transformer_dtype=torch.bfloat16`` keeps the frozen LoRA base in bf16 to halve memory).

:class:`QwenImageEditAdapter` (Qwen-Image-Edit) extends this with the source image: see its docstring.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .base import Conditioning, broadcast_rows
from .common import DiffusersAdapterBase, compute_dtype, dtype_kwarg
from .flux import PackedGeometry, pack_latents, unpack_latents

if TYPE_CHECKING:
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

#: default LoRA targets, as upstream Flow-GRPO's Qwen-Image trainer (scripts/train_qwenimage.py): the joint
#: attention's image and text projections and both streams' MLPs of every block
QWEN_IMAGE_LORA_TARGETS: list[str] = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]


# ------------------------------------------------------------------------------------------------- helpers


def pad_to_length(embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or truncate) text embeddings [B, L, D] and their mask [B, L] (None = all valid) to ``length``:
    (fp32 [B, length, D] with zero padding, int64 [B, length] with 0 on padding)."""
    b, n, d = embeds.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
    out = embeds.new_zeros(b, length, d, dtype=torch.float32)
    out_mask = torch.zeros(b, length, dtype=torch.long, device=embeds.device)
    m = min(n, length)
    out[:, :m] = embeds[:, :m].float()
    out_mask[:, :m] = mask[:, :m].long()
    return out, out_mask


def trim_text(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the trailing columns that are padding in every row; mask None when every kept token is valid (what the
    pipeline passes then). embeds [N, L, D], mask [N, L] -> [N, L', D], [N, L'] or None."""
    valid = mask.bool()
    cols = valid.any(dim=0).nonzero()
    keep = int(cols.max()) + 1 if cols.numel() else 1
    embeds, valid = embeds[:, :keep], valid[:, :keep]
    return embeds, (None if bool(valid.all()) else valid)


def rescaled_cfg(v_u: torch.Tensor, v_c: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG on packed velocities [B, T, F]: ``v = v_u + w (v_c - v_u)``, then every token rescaled
    to the norm of its conditional velocity, ``v |v_c| / |v|`` (norms over the last dim)."""
    comb = v_u + scale * (v_c - v_u)
    return comb * (torch.linalg.vector_norm(v_c, dim=-1, keepdim=True)
                   / torch.linalg.vector_norm(comb, dim=-1, keepdim=True))


# ------------------------------------------------------------------------------------------------------ adapter


class QwenImageAdapter(PackedGeometry, DiffusersAdapterBase):
    """Qwen-Image adapter. Build with :meth:`from_pretrained` (a diffusers directory) or :meth:`from_pipeline`.

    Beyond the protocol: ``resolution`` (the image size ``sigmas`` is computed for; settable), ``max_sequence_length``
    (the fixed text length of the conditioning rows), ``image_seq_len(resolution)`` and ``mu(resolution)``.
    """

    family = "qwen_image"
    display_name = "Qwen-Image"
    default_lora_targets = tuple(QWEN_IMAGE_LORA_TARGETS)
    text_encoder_names = ("text_encoder",)
    #: an edit model conditions on a source image (see :mod:`flowgrpo.edit`)
    edit = False
    #: the diffusers pipeline class :meth:`from_pretrained` loads
    pipeline_class_name = "QwenImagePipeline"
    #: the largest ``max_sequence_length`` (QwenImagePipeline's limit)
    max_text_tokens = 1024

    def __init__(
        self,
        pipe: "QwenImagePipeline",
        device: str | torch.device = "cpu",
        mixed_precision: str = "no",
        max_sequence_length: int = 512,
        full_finetune: bool = False,
        needs_reference: bool = True,
        resolution: int | None = None,
        transformer_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(pipe, device=device, mixed_precision=mixed_precision, full_finetune=full_finetune,
                         needs_reference=needs_reference, transformer_dtype=transformer_dtype)
        cfg = self.transformer.config
        if int(cfg.patch_size) != 2:
            raise NotImplementedError(f"Qwen-Image transformers with patch_size={cfg.patch_size} are not supported")
        if bool(getattr(cfg, "guidance_embeds", False)) or bool(getattr(cfg, "zero_cond_t", False)):
            raise NotImplementedError("guidance-distilled / zero_cond_t Qwen-Image transformers are not supported")
        if not 1 <= int(max_sequence_length) <= self.max_text_tokens:
            raise ValueError(f"max_sequence_length must be in [1, {self.max_text_tokens}] (the pipeline's limit), "
                             f"got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)
        self.latent_channels = int(cfg.in_channels) // 4
        vae_cfg = pipe.vae.config
        if int(vae_cfg.z_dim) != self.latent_channels:
            raise ValueError(f"VAE z_dim {vae_cfg.z_dim} != transformer latent channels {self.latent_channels}")
        self.vae_scale_factor = 2 ** len(vae_cfg.temperal_downsample)
        # per-channel normalisation of the VAE latents, [1, C, 1, 1, 1]: z_model = (z_vae - mean) / std
        shape = (1, self.latent_channels, 1, 1, 1)
        self.latents_mean = torch.tensor(vae_cfg.latents_mean, dtype=torch.float32).view(shape).to(self.device)
        self.latents_std = torch.tensor(vae_cfg.latents_std, dtype=torch.float32).view(shape).to(self.device)
        self._init_geometry(resolution if resolution is not None else 1024)
        if self.full_finetune:
            self._freeze_unused()

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> "QwenImageAdapter":
        """Wrap an in-memory pipeline (its modules are moved/cast in place); kwargs as for the constructor."""
        return cls(pipe, **kwargs)

    @classmethod
    def _load_pipeline(cls, path: str | os.PathLike, torch_dtype: Any) -> Any:
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name).from_pretrained(str(path), **{dtype_kwarg(): torch_dtype})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu", mixed_precision: str = "no",
                        **kwargs: Any) -> "QwenImageAdapter":
        """Load a local diffusers-format directory. On CUDA with mixed precision the text encoder (Qwen2.5-VL-7B) is
        loaded directly in the compute dtype, the transformer in ``transformer_dtype`` (default fp32 master weights),
        the VAE in fp32. The default resolution is 1024 (Qwen-Image's) or, for flowgrpo's tiny models, the one in
        their marker file."""
        dtype = compute_dtype(mixed_precision)
        torch_dtype: Any = torch.float32
        if dtype is not None and torch.device(device).type == "cuda":
            tdtype = kwargs.get("transformer_dtype", torch.float32)
            torch_dtype = {"transformer": tdtype, "vae": torch.float32, "default": dtype}
        pipe = cls._load_pipeline(path, torch_dtype)
        if kwargs.get("resolution") is None:
            kwargs["resolution"] = _marker_resolution(path)
        return cls(pipe, device=device, mixed_precision=mixed_precision, **kwargs)

    # ---------------------------------------------------------------------------------------------- training

    def _unused_prefixes(self) -> tuple[str, ...]:
        """Parameters that cannot change the output: the last block's text-stream outputs. The text stream is
        discarded after the last block, so its text queries (``add_q_proj``, ``norm_added_q``), text attention output
        (``to_add_out``) and text MLP get no (or an all-zero) gradient; its text keys and values still matter."""
        last = f"transformer_blocks.{len(self.transformer.transformer_blocks) - 1}."
        return tuple(last + m for m in ("attn.to_add_out.", "attn.add_q_proj.", "attn.norm_added_q.", "txt_mlp."))

    def _freeze_unused(self) -> None:
        """Freeze the parameters of :meth:`_unused_prefixes` (they would get no gradient: DDP without
        ``find_unused_parameters`` fails on trainable parameters without one)."""
        for n, p in self.transformer.named_parameters():
            if n.startswith(self._unused_prefixes()):
                p.requires_grad_(False)

    def add_lora(self, rank: int, alpha: int, target_modules: Sequence[str] | None = None,
                 init: str = "gaussian") -> None:
        """As :meth:`DiffusersAdapterBase.add_lora`; the LoRA matrices on the last block's text-stream outputs are
        frozen (they cannot change the velocity) and are not trainable parameters."""
        super().add_lora(rank, alpha, target_modules, init)
        self._freeze_unused()

    def _trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        unused = self._unused_prefixes()
        return [(n, p) for n, p in super()._trainable_named() if not n.startswith(unused)]

    # ------------------------------------------------------------------------------------------------- text

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """{"prompt_embeds": fp32 [B, max_sequence_length, D] (Qwen2.5-VL last hidden states after the template
        prefix, zero right-padding), "prompt_embeds_mask": int64 [B, max_sequence_length] (1 = valid token)}."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        pe, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                           max_sequence_length=self.max_sequence_length)
        pe, mask = pad_to_length(pe, mask, self.max_sequence_length)
        return {"prompt_embeds": pe, "prompt_embeds_mask": mask}

    # --------------------------------------------------------------------------------------------- velocity

    def _transformer_inputs(self, x: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, list]:
        """Packed hidden states [N, T, 4C] and ``img_shapes`` of the transformer call for latents x [N, C, H, W]
        (the edit adapter appends the source image tokens)."""
        n, _, h, w = x.shape
        return pack_latents(x), [[(1, h // 2, w // 2)]] * n

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

        guidance_scale <= 1: ONE transformer call on B rows. guidance_scale > 1: ONE call on [negative; positive]
        (2B rows), then :func:`rescaled_cfg` (the pipeline's CFG with norm rescaling). A 1-row ``negative`` is
        broadcast."""
        h, w = latents.shape[-2:]
        cfg = guidance_scale > 1.0
        x, s, c = self._velocity_inputs(latents, sigma, cond, negative, cfg)  # [N, C, H, W], [N], N = B or 2B
        text, mask = trim_text(c["prompt_embeds"], c["prompt_embeds_mask"])
        hidden, img_shapes = self._transformer_inputs(x, c)
        net = self._network(model)
        with self._autocast():
            out = net(
                hidden_states=hidden,  # [N, T (+ source tokens), 4C]
                encoder_hidden_states=text,
                encoder_hidden_states_mask=mask,
                timestep=s,
                img_shapes=img_shapes,
                guidance=None,
                return_dict=False,
            )[0]
        out = out[:, : (h // 2) * (w // 2)].float()  # the noisy tokens' velocity [N, T, 4C]
        if cfg:
            v_u, v_c = out.chunk(2)  # [B, T, 4C] each
            out = rescaled_cfg(v_u, v_c, guidance_scale)
        return unpack_latents(out, h, w)

    # ----------------------------------------------------------------------------------------------- decode

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents [B, 16, h, w] -> fp32 images [B, 3, 8h, 8w] in [0, 1] (``z std + mean``, one-frame VAE
        decode)."""
        vae = self.pipe.vae
        z = latents.to(self.device, torch.float32)[:, :, None] * self.latents_std + self.latents_mean  # [B, C, 1, h, w]
        x = vae.decode(z.to(vae.dtype), return_dict=False)[0][:, :, 0]
        return (x.float() / 2 + 0.5).clamp(0, 1)


#: written by :meth:`QwenImageEditAdapter.save_pretrained`: the settings an exported edit model was trained with
EDIT_SETTINGS_FILE = "flowgrpo_edit.json"


def _marker_resolution(path: str | os.PathLike, key: str = "resolution") -> int | None:
    """A size recorded beside the model: by an exported edit model (:data:`EDIT_SETTINGS_FILE`) or by flowgrpo's
    tiny models (``flowgrpo_tiny.json``); else None."""
    import json
    from pathlib import Path

    from .tiny import TINY_MARKER

    for name in (EDIT_SETTINGS_FILE, TINY_MARKER):
        try:
            return int(json.loads((Path(path) / name).read_text())[key])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# ------------------------------------------------------------------------------------------- Qwen-Image-Edit


def make_qwen2vl_processor(image_processor: Any, tokenizer: Any) -> Any:
    """A transformers ``Qwen2VLProcessor`` without a video processor. transformers 5's Qwen2-VL video processor needs
    torchvision, and the processor refuses a missing one; the edit pipeline only passes images, so the PIL image
    processor (``Qwen2VLImageProcessorPil``) and the tokenizer are all it needs."""
    from transformers import Qwen2VLProcessor

    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    check = Qwen2VLProcessor.check_argument_for_proper_class
    proc.check_argument_for_proper_class = lambda name, arg: None if arg is None else check(proc, name, arg)
    try:
        Qwen2VLProcessor.__init__(proc, image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
    finally:
        del proc.check_argument_for_proper_class
    return proc


def load_edit_pipeline(path: str | os.PathLike, **kwargs: Any) -> "QwenImageEditPipeline":
    """``QwenImageEditPipeline.from_pretrained`` without torchvision: the processor is rebuilt from
    ``path/processor`` (image processor config + the pipeline's tokenizer) by :func:`make_qwen2vl_processor`."""
    from diffusers import QwenImageEditPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pipe = QwenImageEditPipeline.from_pretrained(str(path), processor=None, **kwargs)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path), subfolder="processor")
    pipe.register_modules(processor=make_qwen2vl_processor(image_processor, pipe.tokenizer))
    return pipe


def save_edit_pipeline(pipe: Any, out_dir: str | os.PathLike, **components: Any) -> None:
    """Save a ``QwenImageEditPipeline`` (``components`` override the pipeline's, e.g. a merged transformer): every
    component as ``save_pretrained`` writes it, the processor as its image processor config + tokenizer under
    ``processor/`` (a processor without a video processor cannot save itself), listed in ``model_index.json`` as
    transformers' ``Qwen2VLProcessor`` like Qwen/Qwen-Image-Edit's (loading that entry the standard way needs
    torchvision; :func:`load_edit_pipeline` does not)."""
    parts = {**pipe.components, **components, "processor": None}
    type(pipe)(**parts).save_pretrained(str(out_dir), safe_serialization=True)
    _write_processor(pipe.processor, out_dir)


def _write_processor(proc: Any, out_dir: str | os.PathLike) -> None:
    """``out_dir/processor/`` = the processor's image processor config + tokenizer; ``model_index.json`` lists it."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    proc.image_processor.save_pretrained(str(out / "processor"))
    proc.tokenizer.save_pretrained(str(out / "processor"))
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _to_pil(images: torch.Tensor) -> list:
    """fp32 [B, 3, H, W] in [0, 1] -> PIL RGB images (8-bit, as the source files)."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit adapter (``QwenImageEditPipeline``): Qwen-Image conditioned on a source image.

    Edit protocol (:mod:`flowgrpo.edit`): ``edit = True``; :meth:`encode_prompts` takes ``images``, the source image
    of every prompt row as fp32 ``[B, 3, R, R]`` in [0, 1] (required). The source enters the model twice, as in the
    pipeline:

    * through the Qwen2.5-VL encoder: the edit template holds ``<|vision_start|><|image_pad|><|vision_end|>`` before the
      instruction; the processor expands ``<|image_pad|>`` to one token per 2x2 merged 14-px patch and the vision
      tower's features replace them. The first 64 template tokens are dropped, so the text rows hold the image tokens
      + the instruction: ``max_sequence_length`` (default 1536) must cover both (a clear error otherwise; nothing
      is truncated, as in the pipeline; a 1024 px source alone takes 1 + 37 x 37 + 1 tokens);
    * through the VAE: the source latents (``argmax`` of the posterior, normalised with ``latents_mean/std``) are
      stored unpacked as ``"image_latents"`` fp32 [B, C, S/8, S/8]; :meth:`velocity` packs them and appends them
      after the noisy tokens (``img_shapes = [(1, H/2, W/2), (1, S/16, S/16)]``, the second rotary group), and reads the
      velocity on the noisy (target) tokens only.

    Source size: the pipeline resizes the source to a 1024 x 1024 area whatever the output size
    (``calculate_dimensions``); :attr:`source_resolution` (default 1024; flowgrpo's tiny models record theirs) is that
    square size S. The source
    is resized with the pipeline's image processor (Lanczos) before both encoders; ``source_resolution=None`` keeps it
    at the size given (the sample resolution).

    CFG negative: the pipeline encodes the negative prompt *with the source image* (VL encoder), so the exact
    negative rows come from ``encode_prompts([neg] * B, images)`` (what flowgrpo's recipe does). A negative without
    ``"image_latents"`` (e.g. a text-only row) is still accepted: :meth:`velocity` then copies ``image_latents`` from
    ``cond`` into the negative rows, so the unconditional branch always sees the same source tokens.
    """

    family = "qwen_image_edit"
    edit = True
    pipeline_class_name = "QwenImageEditPipeline"
    #: the edit pipeline does not truncate: the rows hold the source's image tokens (1369 for a 1024 px source) too
    max_text_tokens = 8192

    def __init__(self, pipe: "QwenImageEditPipeline", *args: Any, source_resolution: int | None = 1024,
                 max_sequence_length: int = 1536, **kwargs: Any) -> None:
        super().__init__(pipe, *args, max_sequence_length=max_sequence_length, **kwargs)
        if getattr(pipe, "processor", None) is None:
            raise ValueError("QwenImageEditAdapter needs the pipeline's processor (see load_edit_pipeline)")
        if source_resolution is not None:
            self._check_resolution(int(source_resolution))
        self.source_resolution = None if source_resolution is None else int(source_resolution)

    @classmethod
    def _load_pipeline(cls, path: str | os.PathLike, torch_dtype: Any) -> Any:
        return load_edit_pipeline(path, **{dtype_kwarg(): torch_dtype})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu", mixed_precision: str = "no",
                        **kwargs: Any) -> "QwenImageEditAdapter":
        """As :meth:`QwenImageAdapter.from_pretrained`, without torchvision (:func:`load_edit_pipeline`); the default
        ``source_resolution`` is 1024 (the pipeline's) or a tiny model's recorded one."""
        if "source_resolution" not in kwargs:
            kwargs["source_resolution"] = _marker_resolution(path, "source_resolution") or 1024
        return super().from_pretrained(path, device=device, mixed_precision=mixed_precision, **kwargs)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """As :meth:`DiffusersAdapterBase.save_pretrained` (LoRA merged, ``lora/`` beside); the processor as
        :func:`save_edit_pipeline` writes it (reload with :func:`load_edit_pipeline` or :meth:`from_pretrained`)."""
        proc = self.pipe.processor
        self.pipe.register_modules(processor=None)  # a video-less processor cannot save itself
        try:
            super().save_pretrained(out_dir)
        finally:
            self.pipe.register_modules(processor=proc)
        _write_processor(proc, out_dir)
        if self.source_resolution is not None:  # reloading (e.g. for evaluation) resizes sources the same way
            import json
            from pathlib import Path

            (Path(out_dir) / EDIT_SETTINGS_FILE).write_text(
                json.dumps({"source_resolution": self.source_resolution}) + "\n")

    # ------------------------------------------------------------------------------------------------- text

    def _source_images(self, images: torch.Tensor) -> list:
        """The source images as the pipeline feeds them: PIL, resized to :attr:`source_resolution` (Lanczos)."""
        pil = _to_pil(images)
        s = self.source_resolution
        if s is not None and pil[0].size != (s, s):
            pil = [self.pipe.image_processor.resize(im, s, s) for im in pil]
        return pil

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], images: torch.Tensor | None = None) -> Conditioning:
        """{"prompt_embeds": fp32 [B, max_sequence_length, D], "prompt_embeds_mask": int64 [B, max_sequence_length],
        "image_latents": fp32 [B, C, S/8, S/8]} for edit instructions and their source images (fp32 [B, 3, R, R] in
        [0, 1], one per prompt; required)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        if images is None:
            raise ValueError(f"{type(self).__name__} edits a source image: encode_prompts(prompts, images) needs the "
                             "source images, fp32 [B, 3, R, R] in [0, 1], one per prompt")
        if images.ndim != 4 or images.shape[0] != len(prompts) or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] with B = {len(prompts)} prompts, got {tuple(images.shape)}")
        pil = self._source_images(images)
        pe, mask = self.pipe.encode_prompt(prompt=prompts, image=pil, device=self.device)
        if pe.shape[1] > self.max_sequence_length:
            raise ValueError(f"the edit prompt + source image take {pe.shape[1]} text tokens > max_sequence_length="
                             f"{self.max_sequence_length}: raise model.max_sequence_length")
        pe, mask = pad_to_length(pe, mask, self.max_sequence_length)
        return {"prompt_embeds": pe, "prompt_embeds_mask": mask, "image_latents": self._encode_source(pil)}

    @torch.no_grad()
    def _encode_source(self, pil: list) -> torch.Tensor:
        """Normalised VAE latents of the source images, fp32 [B, C, S/8, S/8] (posterior mode, as the pipeline)."""
        w, h = pil[0].size
        x = self.pipe.image_processor.preprocess(pil, h, w)  # [B, 3, S, S] in [-1, 1]
        vae = self.pipe.vae
        z = vae.encode(x.to(self.device, vae.dtype)[:, :, None]).latent_dist.mode()  # [B, C, 1, S/8, S/8]
        return ((z.float() - self.latents_mean) / self.latents_std)[:, :, 0]

    # --------------------------------------------------------------------------------------------- velocity

    def _transformer_inputs(self, x: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, list]:
        """[noisy tokens; source tokens] [N, T + T_src, 4C] and the two rotary groups of every row."""
        n, _, h, w = x.shape
        src = cond["image_latents"].to(self.device, torch.float32)  # [N, C, h', w']
        hs, ws = src.shape[-2:]
        hidden = torch.cat([pack_latents(x), pack_latents(src)], dim=1)
        return hidden, [[(1, h // 2, w // 2), (1, hs // 2, ws // 2)]] * n

    def _negative_rows(self, negative: Conditioning, cond: Conditioning, batch: int) -> Conditioning:
        """Negative rows; ``image_latents`` copied from ``cond`` when the negative has none."""
        neg = broadcast_rows(negative, batch, self.device)
        if "image_latents" not in neg:
            neg["image_latents"] = cond["image_latents"]
        return super()._negative_rows(neg, cond, batch)


__all__ = ["QWEN_IMAGE_LORA_TARGETS", "QwenImageAdapter", "QwenImageEditAdapter", "load_edit_pipeline",
           "make_qwen2vl_processor", "pad_to_length", "rescaled_cfg", "save_edit_pipeline", "trim_text"]
