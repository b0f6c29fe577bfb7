"""Tiny, randomly initialised reward models for offline tests and development.

The CLIP-based rewards (``aesthetic``, ``clipscore``, ``pickscore``, ``image_similarity``) load a transformers
``CLIPModel`` plus a tokenizer and a ``CLIPImageProcessor`` from a directory. :func:`make_tiny_clip` writes such a
directory (``save_pretrained`` of all three), with every size shrunk, so the rewards' real loading path runs with
no network::

    d = make_tiny_clip(tmp / "clip")                         # config.json, model.safetensors, tokenizer, processor
    build_reward("clipscore", model=str(d))
    build_reward("pickscore", model=str(d), processor=str(d))
    head = save_aesthetic_head(tmp / "head.pth", input_dim=tiny_clip_projection_dim(d))
    build_reward("aesthetic", model=str(d), head_path=str(head))

The tokenizer is the byte-level CLIP BPE of :func:`flowgrpo.models.tiny.build_clip_tokenizer` (any English text
tokenizes). Weights are a deterministic function of the seed; the global torch RNG is left untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

#: default sizes of the tiny CLIP (both towers)
TINY_CLIP = {
    "hidden": 32,
    "intermediate": 64,
    "layers": 2,
    "heads": 4,
    "projection_dim": 16,
    "image_size": 32,
    "patch_size": 8,
}


def build_tiny_clip(seed: int = 0, image_size: int = TINY_CLIP["image_size"],
                    projection_dim: int = TINY_CLIP["projection_dim"], logit_scale: float | None = None):
    """(model, tokenizer, image_processor): a random ``CLIPModel`` in eval mode with tiny text and vision towers,
    the byte-level tiny CLIP tokenizer and a PIL-backed CLIP image processor resizing/cropping to ``image_size``.
    ``logit_scale``: the (un-logged) temperature, e.g. 100 as in OpenAI CLIP; default: transformers' init (1/0.07)."""
    from transformers import CLIPConfig, CLIPModel

    from flowgrpo.models.tiny import build_clip_tokenizer

    tok = build_clip_tokenizer()
    s = TINY_CLIP
    text_cfg = dict(
        vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], max_position_embeddings=tok.model_max_length,
        hidden_act="gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision_cfg = dict(
        hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], image_size=image_size, patch_size=s["patch_size"], hidden_act="gelu",
    )
    cfg = CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(float(torch.log(torch.tensor(float(logit_scale)))))
    model.eval()
    return model, tok, _tiny_image_processor(image_size)


def _tiny_image_processor(image_size: int):
    from flowgrpo.rewards.clip_rewards import image_processor_class

    return image_processor_class()(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True, do_center_crop=True, do_normalize=True, do_rescale=True, do_convert_rgb=True,
    )


def make_tiny_clip(out_dir: str | os.PathLike, seed: int = 0, image_size: int = TINY_CLIP["image_size"],
                   projection_dim: int = TINY_CLIP["projection_dim"], logit_scale: float | None = None) -> Path:
    """Save a tiny CLIP (model + tokenizer + image processor, transformers format) to ``out_dir``; returns it.
    ``CLIPModel.from_pretrained(out_dir)``, ``AutoTokenizer.from_pretrained(out_dir)`` and
    ``CLIPImageProcessor.from_pretrained(out_dir)`` then work offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, proc = build_tiny_clip(seed, image_size, projection_dim, logit_scale)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    proc.save_pretrained(out)
    (out / "flowgrpo_tiny_clip.json").write_text(json.dumps(
        {"seed": seed, "image_size": image_size, "projection_dim": projection_dim, "logit_scale": logit_scale},
        indent=2) + "\n")
    return out


def cached_tiny_clip(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The default tiny CLIP (``model: tiny-clip`` in reward options), saved once as ``<cache_dir>/clip-tiny-<seed>``
    (default cache root: :func:`flowgrpo.models.tiny.default_cache_root`; built atomically)."""
    from flowgrpo.models.tiny import build_once, default_cache_root

    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return build_once(root / f"clip-tiny-{seed}", lambda d: make_tiny_clip(d, seed=seed), "flowgrpo_tiny_clip.json")


def tiny_clip_projection_dim(model_dir: str | os.PathLike) -> int:
    """The embedding size of a saved CLIP (= the aesthetic head's input size)."""
    return int(json.loads((Path(model_dir) / "config.json").read_text())["projection_dim"])


def save_aesthetic_head(path: str | os.PathLike, input_dim: int = 768, seed: int = 0) -> Path:
    """Save a random aesthetic MLP head state dict with the public LAION predictor's key layout
    (``layers.{0,2,4,6,7}.{weight,bias}``) to ``path``: ``.safetensors`` or a torch ``.pth``/``.pt`` file."""
    from flowgrpo.rewards.clip_rewards import AestheticMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticMLP(input_dim)
    sd = {k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(p))
    else:
        torch.save(sd, p)
    return p


__all__ = ["TINY_CLIP", "build_tiny_clip", "make_tiny_clip", "save_aesthetic_head", "tiny_clip_projection_dim"]
