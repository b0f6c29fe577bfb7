"""FLUX.1-Kontext adapter on the offline tiny Kontext pipeline (64 px, CPU): the edit conditioning (source image ->
packed latents appended as tokens with rotary ids (1, row, col)), equality with diffusers' FluxKontextPipeline, and
the invariants every adapter keeps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flowgrpo.models import loading, tiny_flux  # noqa: E402
from flowgrpo.models.flux import pack_latents, unpack_latents  # noqa: E402
from flowgrpo.models.flux_kontext import FluxKontextAdapter  # noqa: E402
from flowgrpo.rollout import initial_noise, rollout  # noqa: E402

MSL = 16


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_flux.make_tiny_flux_model(tmp_path_factory.mktemp("models") / "kontext", spec_name="kontext")


@pytest.fixture
def adapter(kontext_dir: Path) -> FluxKontextAdapter:
    return FluxKontextAdapter.from_pretrained(kontext_dir, max_sequence_length=MSL)


def _sources(n: int, seed: int = 0) -> tuple[list[Image.Image], torch.Tensor]:
    """n random 64 px RGB images, as PIL and as the fp32 [n, 3, 64, 64] tensor in [0, 1] the recipe passes."""
    g = np.random.default_rng(seed)
    arrs = [g.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]
    return [Image.fromarray(a) for a in arrs], torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255
                                                            for a in arrs])


def test_tiny_kontext_is_a_kontext_pipeline_with_its_family(kontext_dir: Path, tmp_path, monkeypatch) -> None:
    import json

    from diffusers import FluxKontextPipeline

    assert isinstance(FluxKontextPipeline.from_pretrained(kontext_dir), FluxKontextPipeline)
    assert json.loads((kontext_dir / "flowgrpo_tiny.json").read_text())["family"] == "flux_kontext"
    # the text-to-image tiny FLUX keeps its cache key (the pipeline field only enters non-default keys)
    assert tiny_flux.tiny_flux_cache_key("tiny") != tiny_flux.tiny_flux_cache_key("kontext")
    monkeypatch.setattr(tiny_flux, "make_tiny_flux_model", lambda out, seed=0, spec_name="tiny": (
        Path(out).mkdir(parents=True, exist_ok=True), (Path(out) / "flowgrpo_tiny.json").write_text(spec_name)))
    path = loading.resolve_model_path("tiny-flux-kontext", cache_dir=tmp_path)
    assert path.name.startswith("flux-kontext-") and (path / "flowgrpo_tiny.json").read_text() == "kontext"
    assert loading.ADAPTERS["flux_kontext"] is FluxKontextAdapter and FluxKontextAdapter.edit


def test_encode_prompts_appends_packed_source_latents(adapter: FluxKontextAdapter) -> None:
    _, src = _sources(2)
    cond = adapter.encode_prompts(["add a cat", "remove it"], images=src)
    assert cond["image_latents"].shape == (2, 16, 64)  # (64/16)^2 tokens of 4 x 16 channels
    vae = adapter.pipe.vae
    z = vae.encode(src * 2 - 1).latent_dist.mode()
    expected = pack_latents((z - vae.config.shift_factor) * vae.config.scaling_factor)
    torch.testing.assert_close(cond["image_latents"], expected)
    with pytest.raises(ValueError, match="needs the source images"):
        adapter.encode_prompts(["add a cat"])
    with pytest.raises(ValueError, match="2 prompts but 1 source"):
        adapter.encode_prompts(["a", "b"], images=src[:1])
    with pytest.raises(ValueError, match="square"):
        adapter.encode_prompts(["a"], images=torch.rand(1, 3, 64, 32))


def test_ode_rollout_equals_flux_kontext_pipeline(adapter: FluxKontextAdapter) -> None:
    """Noise level 0 (the ODE) from the same initial noise, sigmas and source images gives diffusers'
    FluxKontextPipeline output: the source tokens, their ids, the slicing and the guidance embedding agree."""
    pils, src = _sources(2)
    prompts = ["make the circle red", "two cats"]
    cond = adapter.encode_prompts(prompts, images=src)
    ours, *_ = rollout(adapter, cond, None, sigmas=adapter.sigmas(4), window=None, guidance_scale=2.5,
                       noise_level=0.0, sde_type="sde", sample_seeds=[1, 2], resolution=64, decode=False)
    x0 = initial_noise(adapter.latent_shape(64), [1 ^ 0x5EED, 2 ^ 0x5EED], adapter.device)  # rollout's init seeds
    out = adapter.pipe(image=pils, prompt=prompts, height=64, width=64, num_inference_steps=4, guidance_scale=2.5,
                       latents=pack_latents(x0), output_type="latent", max_sequence_length=MSL,
                       _auto_resize=False, max_area=64 * 64).images
    theirs = unpack_latents(out, 8, 8)
    assert (ours - theirs).abs().max() < 1e-5
    assert ours.abs().mean() > 0.1


def test_velocity_depends_on_the_source_and_sees_it_as_the_second_image(adapter: FluxKontextAdapter) -> None:
    _, src = _sources(2)
    x = torch.randn(2, *adapter.latent_shape(64), generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.9, 0.5])
    cond = adapter.encode_prompts(["edit", "edit"], images=src)
    swapped = adapter.encode_prompts(["edit", "edit"], images=src.flip(0))
    with torch.no_grad():
        v = adapter.velocity(x, sigma, cond, 2.5)
        v_swapped = adapter.velocity(x, sigma, swapped, 2.5)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert (v - v_swapped).abs().max() > 1e-4  # the source matters
    ids: list[torch.Tensor] = []
    h = adapter.transformer.register_forward_hook(lambda m, a, kw, o: ids.append(kw["img_ids"]), with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.velocity(x, sigma, cond, 2.5)
    finally:
        h.remove()
    (img_ids,) = ids
    assert img_ids.shape == (32, 3)  # 16 noisy + 16 source tokens
    assert img_ids[:16, 0].eq(0).all() and img_ids[16:, 0].eq(1).all()
    torch.testing.assert_close(img_ids[:16, 1:], img_ids[16:, 1:])
    with pytest.raises(ValueError, match="no 'image_latents'"):
        adapter.velocity(x, sigma, {k: t for k, t in cond.items() if k != "image_latents"}, 2.5)


def test_true_cfg_negative_carries_its_source(kontext_dir: Path) -> None:
    adapter = FluxKontextAdapter.from_pretrained(kontext_dir, max_sequence_length=MSL, true_cfg=True)
    assert adapter.needs_negative
    _, src = _sources(2)
    x = torch.randn(2, *adapter.latent_shape(64), generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.7, 0.7])
    cond = adapter.encode_prompts(["edit a", "edit b"], images=src)
    neg = adapter.encode_prompts(["", ""], images=src)
    with torch.no_grad():
        v = adapter.velocity(x, sigma, cond, 4.0, neg)
        v_c = adapter.velocity(x, sigma, cond, 1.0)
        v_u = adapter.velocity(x, sigma, neg, 1.0)
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u), atol=1e-5, rtol=1e-4)


def test_lora_save_pretrained_reloads_as_kontext(adapter: FluxKontextAdapter, tmp_path: Path) -> None:
    from diffusers import FluxKontextPipeline

    adapter.add_lora(4, 8)
    with torch.no_grad():
        for n, p in adapter.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    adapter.save_pretrained(tmp_path / "out")
    reloaded = FluxKontextAdapter.from_pipeline(FluxKontextPipeline.from_pretrained(tmp_path / "out"),
                                                max_sequence_length=MSL)
    _, src = _sources(1)
    cond = adapter.encode_prompts(["edit"], images=src)
    x = torch.randn(1, *adapter.latent_shape(64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        v, v_reloaded = adapter.velocity(x, torch.tensor([0.6]), cond, 2.5), reloaded.velocity(
            x, torch.tensor([0.6]), cond, 2.5)
        with adapter.reference():
            v_ref = adapter.velocity(x, torch.tensor([0.6]), cond, 2.5)
    assert (v - v_reloaded).abs().max() < 1e-5 and (v - v_ref).abs().max() > 1e-4
