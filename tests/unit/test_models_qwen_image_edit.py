"""Qwen-Image-Edit adapter on the offline tiny QwenImageEditPipeline (64 px, CPU, no torchvision): the edit protocol
(``edit = True``, ``encode_prompts(prompts, images)``), the source image through the VL encoder and as extra packed
tokens after the noisy ones, velocity read on the target tokens, the pipeline's CFG, noise 0 == ODE, export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flowgrpo.models import loading  # noqa: E402
from flowgrpo.models import tiny_qwen_image as tq  # noqa: E402
from flowgrpo.models.flux import pack_latents, unpack_latents  # noqa: E402
from flowgrpo.models.qwen_image import QwenImageEditAdapter, load_edit_pipeline, rescaled_cfg  # noqa: E402
from flowgrpo.models.tiny import TINY_MARKER  # noqa: E402

MSL = 32


@pytest.fixture(scope="module")
def tiny_edit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tq.make_tiny_qwen_image_model(tmp_path_factory.mktemp("models") / "tiny_qwen_edit", spec_name="tiny-edit")


@pytest.fixture(scope="module")
def adapter(tiny_edit_dir: Path) -> QwenImageEditAdapter:
    return QwenImageEditAdapter.from_pretrained(tiny_edit_dir, max_sequence_length=MSL)


@pytest.fixture(scope="module")
def inputs(adapter: QwenImageEditAdapter):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *adapter.latent_shape(64), generator=g)  # [2, 16, 8, 8]
    src = torch.rand(2, 3, 64, 64, generator=g)
    sigma = torch.tensor([0.9, 0.4])
    cond = adapter.encode_prompts(["add a cat", "remove two dogs"], src)
    neg = adapter.encode_prompts(["", ""], src)
    return x, sigma, src, cond, neg


def test_tiny_edit_model_loads_offline_and_encodes_the_source(tiny_edit_dir: Path, adapter, inputs) -> None:
    from diffusers import QwenImageEditPipeline

    info = json.loads((tiny_edit_dir / TINY_MARKER).read_text())
    assert info["family"] == "qwen_image_edit" and info["source_resolution"] == 64
    index = json.loads((tiny_edit_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    pipe = load_edit_pipeline(tiny_edit_dir)  # no torchvision needed
    assert isinstance(pipe, QwenImageEditPipeline) and pipe.processor.image_processor.merge_size == 2
    prefix = pipe.prompt_template_encode.split("<|vision_start|>")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 64
    assert adapter.edit and adapter.family == "qwen_image_edit" and loading.ADAPTERS["qwen_image_edit"] is type(adapter)
    _, _, src, cond, _ = inputs
    assert set(cond) == {"prompt_embeds", "prompt_embeds_mask", "image_latents"}
    assert cond["prompt_embeds"].shape == (2, MSL, 32) and cond["image_latents"].shape == (2, 16, 8, 8)
    # the VL rows hold <|vision_start|>, the source's image tokens (64 px -> 56 px -> 4 x 4 patches -> 2 x 2 merged =
    # 4 tokens), <|vision_end|>, the instruction and the template's 5-token suffix
    pe, mask = pipe.encode_prompt(["add a cat"], image=adapter._source_images(src[:1]), device="cpu")
    n = pe.shape[1]
    assert n == int(cond["prompt_embeds_mask"][0].sum()) == 1 + 4 + 1 + len(pipe.tokenizer("add a cat").input_ids) + 5
    torch.testing.assert_close(cond["prompt_embeds"][:1, :n], pe, rtol=1e-5, atol=1e-6)
    # the source latents are the pipeline's: posterior mode, (z - mean) / std, frame dim dropped
    with torch.no_grad():
        img = pipe.image_processor.preprocess(adapter._source_images(src), 64, 64)
        ref = pipe._encode_vae_image(img[:, :, None], generator=None)[:, :, 0]
    torch.testing.assert_close(cond["image_latents"], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="source images"):
        adapter.encode_prompts(["add a cat"])
    with pytest.raises(ValueError, match="max_sequence_length"):
        QwenImageEditAdapter.from_pipeline(adapter.pipe, max_sequence_length=8, resolution=64,
                                           source_resolution=64).encode_prompts(["add a cat"], src[:1])


def test_velocity_appends_source_tokens_and_reads_the_target(adapter, inputs) -> None:
    x, sigma, src, cond, _ = inputs
    calls: list[dict] = []
    h = adapter.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append({"tokens": kw["hidden_states"].shape[1], "shapes": kw["img_shapes"]}),
        with_kwargs=True)
    try:
        with torch.no_grad():
            v = adapter.velocity(x, sigma, cond, 1.0)
    finally:
        h.remove()
    assert calls[0]["tokens"] == 16 + 16 and calls[0]["shapes"] == [[(1, 4, 4), (1, 4, 4)]] * 2
    n = int(cond["prompt_embeds_mask"].sum(1).max())
    with torch.no_grad():
        ref = adapter.transformer(
            hidden_states=torch.cat([pack_latents(x), pack_latents(cond["image_latents"])], dim=1),
            encoder_hidden_states=cond["prompt_embeds"][:, :n],
            encoder_hidden_states_mask=cond["prompt_embeds_mask"][:, :n],
            timestep=sigma,
            img_shapes=[[(1, 4, 4), (1, 4, 4)]] * 2,
        ).sample[:, :16]
        assert v.shape == x.shape and v.dtype == torch.float32 and torch.equal(v, unpack_latents(ref, 8, 8))
        # the velocity depends on the source image (through both encoders)
        other = adapter.encode_prompts(["add a cat", "remove two dogs"], src.flip(0))
        assert (adapter.velocity(x, sigma, other, 1.0) - v).abs().max() > 1e-4
        only_latents = {**cond, "image_latents": other["image_latents"]}
        assert (adapter.velocity(x, sigma, only_latents, 1.0) - v).abs().max() > 1e-4


def test_cfg_negative_carries_the_source(adapter, inputs) -> None:
    x, sigma, _, cond, neg = inputs
    with torch.no_grad():
        v = adapter.velocity(x, sigma, cond, 4.0, negative=neg)
        v_c = adapter.velocity(x, sigma, cond, 1.0)
        v_u = adapter.velocity(x, sigma, neg, 1.0)
        # a negative without image latents gets the rows' source latents (same tokens in both CFG branches)
        text_only = {k: neg[k] for k in ("prompt_embeds", "prompt_embeds_mask")}
        assert torch.equal(adapter.velocity(x, sigma, cond, 4.0, negative=text_only), v)
    expected = unpack_latents(rescaled_cfg(pack_latents(v_u), pack_latents(v_c), 4.0), 8, 8)
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)


def test_euler_loop_equals_the_edit_pipeline(adapter, inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-step QwenImageEditPipeline call (true CFG, negative "", source resized to the adapter's source size) ==
    our Euler loop on the same initial latents."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (64, 64, None))
    x, _, src, cond, neg = inputs
    with torch.no_grad():
        out = adapter.pipe(image=adapter._source_images(src[:1])[0], prompt="add a cat", negative_prompt="",
                           true_cfg_scale=4.0, num_inference_steps=2, latents=pack_latents(x[:1]), height=64,
                           width=64, output_type="latent").images
        s, lat = adapter.sigmas(2), x[:1]
        c1, n1 = ({k: t[:1] for k, t in d.items()} for d in (cond, neg))
        for i in range(2):
            lat = lat + (s[i + 1] - s[i]) * adapter.velocity(lat, s[i].expand(1), c1, 4.0, negative=n1)
    torch.testing.assert_close(pack_latents(lat), out, rtol=1e-5, atol=1e-5)


def test_rollout_noise_zero_equals_ode(adapter, inputs) -> None:
    from flowgrpo.rollout import rollout
    from flowgrpo.schedule import full_window

    _, _, _, cond, neg = inputs
    kw = dict(sigmas=adapter.sigmas(4), guidance_scale=4.0, sde_type="sde", sample_seeds=[3, 4], resolution=64,
              decode=False)
    ode, *_ = rollout(adapter, cond, neg, window=None, noise_level=0.7, **kw)
    sde0, *_ = rollout(adapter, cond, neg, window=full_window(4), noise_level=0.0, **kw)
    torch.testing.assert_close(sde0, ode, rtol=0, atol=1e-6)
    noisy, *_ = rollout(adapter, cond, neg, window=full_window(4), noise_level=0.7, **kw)
    assert (noisy - ode).abs().max() > 1e-3


def test_lora_and_save_pretrained_reload(tiny_edit_dir: Path, inputs, tmp_path: Path) -> None:
    from diffusers import QwenImageEditPipeline

    x, sigma, _, cond, neg = inputs
    a = QwenImageEditAdapter.from_pretrained(tiny_edit_dir, max_sequence_length=MSL)
    with torch.no_grad():
        v0 = a.velocity(x, sigma, cond, 4.0, negative=neg)
    a.add_lora(4, 8)
    with torch.no_grad():
        assert torch.equal(a.velocity(x, sigma, cond, 4.0, negative=neg), v0)  # LoRA identity at init
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        v1 = a.velocity(x, sigma, cond, 4.0, negative=neg)
        with a.reference():
            assert torch.equal(a.velocity(x, sigma, cond, 4.0, negative=neg), v0)
    a.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "QwenImageEditPipeline"
    # the export records the source size it was trained with, so a reload (e.g. the evaluate step) resizes alike
    b = QwenImageEditAdapter.from_pretrained(tmp_path / "out", max_sequence_length=MSL, resolution=64)
    assert isinstance(b.pipe, QwenImageEditPipeline) and b.source_resolution == a.source_resolution == 64
    assert not any("lora" in n for n, _ in b.transformer.named_parameters())
    with torch.no_grad():
        assert (b.velocity(x, sigma, cond, 4.0, negative=neg) - v1).abs().max() < 1e-4
    assert a.pipe.processor is not None  # restored after saving
