"""FLUX.1-Kontext adapter (image editing): :class:`~flowgrpo.models.flux.FluxAdapter` plus a source image.

Kontext is a FLUX.1 transformer that reads a source image as extra tokens (``FluxKontextPipeline``):

* the source, in [-1, 1], is VAE-encoded (the distribution's mode), normalised like FLUX latents
  (``(z - shift) * scale``) and 2x2-packed into ``[B, M, 4C]`` tokens;
* those tokens are concatenated after the noisy image tokens; their rotary ids are ``(1, row, column)`` (first axis
  1, where the noisy tokens have 0), so the model tells the two images apart;
* the velocity is the transformer output on the noisy tokens only (the first ``(H/2)(W/2)`` tokens).

The source is part of the conditioning: :meth:`FluxKontextAdapter.encode_prompts` takes the source images
(fp32 ``[B, 3, R, R]`` in [0, 1], see :mod:`flowgrpo.edit`) and returns the text rows plus ``"image_latents"``
(``[B, M, 4C]``), so the rollout, the recorded trajectories and the loss carry it like any other conditioning row.
A negative conditioning (true CFG) must carry its own ``image_latents``: the recipe encodes the empty prompt with
each row's source. Sources are square (the recipe resizes them to the sample resolution); upstream likewise
trains Kontext on sources resized to the output size.

Guidance, schedule and precision: as :class:`~flowgrpo.models.flux.FluxAdapter` (distilled guidance embedding;
FLUX's resolution-dependent shift computed for the *target* token count, as the pipeline does).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import Conditioning
from .flux import FluxAdapter, latent_image_ids, pack_latents


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1-Kontext: ``encode_prompts(prompts, images)``; everything else as :class:`FluxAdapter`."""

    family = "flux_kontext"
    pipeline_class = "FluxKontextPipeline"
    #: conditions on a source image (flowgrpo.edit)
    edit = True

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Source images fp32 [B, 3, R, R] in [0, 1] -> packed normalised latents fp32 [B, (R/16)^2, 4C]."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"source images must be square [B, 3, R, R], got {tuple(images.shape)}")
        self._check_resolution(int(images.shape[-1]))
        vae = self.pipe.vae
        x = (images.to(self.device, vae.dtype) * 2 - 1).clamp(-1, 1)  # [B, 3, R, R] in [-1, 1]
        z = vae.encode(x).latent_dist.mode()  # [B, C, R/8, R/8]
        z = (z.float() - self.shift_factor) * self.scaling_factor
        return pack_latents(z)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], images: torch.Tensor | None = None) -> Conditioning:
        """FLUX's text rows plus ``"image_latents"``: fp32 [B, M, 4C], the packed latents of ``images`` (the source
        images, fp32 [B, 3, R, R] in [0, 1], one per prompt; required)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if images is None:
            raise ValueError("FLUX.1-Kontext edits an image: encode_prompts needs the source images (one per prompt, "
                             "fp32 [B, 3, R, R] in [0, 1])")
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} source images")
        cond = super().encode_prompts(prompts)
        cond["image_latents"] = self.encode_images(images)
        return cond

    def _source_ids(self, tokens: int) -> torch.Tensor:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"source image tokens ({tokens}) are not a square grid: sources must be square")
        key = ("source", side)
        if key not in self._img_ids:
            ids = latent_image_ids(2 * side, 2 * side, device=self.device)
            ids[:, 0] = 1  # the source image's first rotary axis
            self._img_ids[key] = ids
        return self._img_ids[key]

    def _extra_tokens(self, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        src = cond.get("image_latents")
        if src is None:
            raise ValueError("FLUX.1-Kontext conditioning has no 'image_latents': encode the prompts with their source "
                             "images (and the negative prompt too, for true CFG)")
        return src, self._source_ids(src.shape[1])


__all__ = ["FluxKontextAdapter"]
