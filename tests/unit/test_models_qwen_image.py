"""Qwen-Image adapter and the offline tiny Qwen-Image (64 px, CPU, offline): the invariants every adapter holds (as
test_models_flux), plus Qwen-Image's own conventions - the offline Qwen2 tokenizer and the dropped template prefix,
fixed-length text rows with a mask, 2x2 packing with the VAE's frame dim, true CFG with the pipeline's norm
rescaling (one 2B call), resolution-dependent sigma shift with shift_terminal, per-channel latent normalisation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.unit.adapter_checks import perturb, velocity_inputs  # noqa: E402
from flowgrpo.models import ModelAdapter, loading  # noqa: E402
from flowgrpo.models import tiny_qwen_image as tq  # noqa: E402
from flowgrpo.models.flux import pack_latents, unpack_latents  # noqa: E402
from flowgrpo.models.qwen_image import (  # noqa: E402
    QWEN_IMAGE_LORA_TARGETS,
    QwenImageAdapter,
    pad_to_length,
    rescaled_cfg,
    trim_text,
)
from flowgrpo.models.tiny import TINY_MARKER  # noqa: E402

MSL = 24  # max_sequence_length: short keeps the tests fast


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tq.make_tiny_qwen_image_model(tmp_path_factory.mktemp("models") / "tiny_qwen", seed=0)


@pytest.fixture
def adapter(tiny_qwen_dir: Path) -> QwenImageAdapter:
    return QwenImageAdapter.from_pretrained(tiny_qwen_dir, max_sequence_length=MSL)


@pytest.fixture
def inputs(adapter: QwenImageAdapter):
    return velocity_inputs(adapter, negative_prompt=" ")


def _record_calls(module):
    """Forward hook recording (rows, text length, mask, timestep) of every transformer call."""
    calls: list[dict] = []

    def hook(m, args, kwargs, out):
        calls.append({"rows": kwargs["hidden_states"].shape[0], "text": kwargs["encoder_hidden_states"].shape[1],
                      "mask": kwargs["encoder_hidden_states_mask"], "timestep": kwargs["timestep"]})

    return calls, module.register_forward_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------------------------- tiny model


def test_tiny_qwen_image_loads_offline(tiny_qwen_dir: Path) -> None:
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    info = json.loads((tiny_qwen_dir / TINY_MARKER).read_text())
    assert info["family"] == "qwen_image" and info["spec"] == "tiny" and info["resolution"] == 64
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_dir)
    assert isinstance(pipe.transformer, QwenImageTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKLQwenImage) and pipe.vae_scale_factor == 8
    assert isinstance(pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(pipe.tokenizer, Qwen2Tokenizer)
    tcfg = pipe.transformer.config
    assert tcfg.in_channels == 4 * pipe.vae.config.z_dim == 64 and not tcfg.guidance_embeds
    assert tcfg.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size
    sc = pipe.scheduler.config
    assert sc.use_dynamic_shifting and sc.shift_terminal == 0.02 and sc.max_image_seq_len == 8192
    tok = pipe.tokenizer
    # the template's system prefix is exactly the 34 tokens the pipeline drops; every special token is one token
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(tok(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    for sp in tq.QWEN_SPECIAL_TOKENS:
        assert len(tok(sp).input_ids) == 1, sp
    text = "A Photo of a Cat, 3 dogs! élan 漢字"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: any text round-trips
    assert pipe.text_encoder.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")


def test_tiny_qwen_image_is_deterministic_and_cached_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tq.build_tiny_qwen_image_pipeline(seed=0), tq.build_tiny_qwen_image_pipeline(seed=0)
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, tb = a.text_encoder.state_dict(), b.text_encoder.state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    c = tq.build_tiny_qwen_image_pipeline(seed=1).transformer.state_dict()
    assert not all(torch.equal(sa[k], c[k]) for k in sa)

    path = tq.cached_tiny_qwen_image_model("tiny", cache_dir=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("qwen-image-tiny-")
    assert (path / "model_index.json").is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.setattr(tq, "make_tiny_qwen_image_model", lambda *a, **k: pytest.fail("rebuilt"))
    assert tq.cached_tiny_qwen_image_model("tiny", cache_dir=tmp_path) == path
    assert loading.resolve_model_path("tiny-qwen-image", cache_dir=tmp_path) == path
    with pytest.raises(ValueError, match="tiny"):
        tq.get_qwen_image_spec("huge")


# ------------------------------------------------------------------------------------------ latent layout


def test_packing_and_text_helpers_match_diffusers() -> None:
    from diffusers import QwenImagePipeline

    x = torch.randn(3, 16, 8, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(x[:, :, None], 3, 16, 8, 6))  # [B, C, 1, H, W] in
    assert torch.equal(QwenImagePipeline._unpack_latents(packed, 64, 48, 8)[:, :, 0], x)  # frame dim out
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    # fixed-length rows + mask; trimming drops all-padding columns, no mask when nothing is padding
    e = torch.randn(2, 5, 4)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    pe, pm = pad_to_length(e, m, 8)
    assert pe.shape == (2, 8, 4) and pm.dtype == torch.long and pm.sum().item() == 7
    assert torch.equal(pe[:, :5], e) and not pe[:, 5:].any()
    te, tm = trim_text(pe, pm)
    assert te.shape == (2, 4, 4) and tm.tolist() == [[True] * 3 + [False], [True] * 4]
    te, tm = trim_text(pe[:1], pm[:1])
    assert te.shape == (1, 3, 4) and tm is None
    pe, pm = pad_to_length(e, None, 3)  # truncation
    assert torch.equal(pe, e[:, :3]) and pm.all()


def test_rescaled_cfg_formula() -> None:
    v_u, v_c = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    v = rescaled_cfg(v_u, v_c, 4.0)
    comb = v_u + 4.0 * (v_c - v_u)
    torch.testing.assert_close(v.norm(dim=-1), v_c.norm(dim=-1))  # per token: the conditional norm
    torch.testing.assert_close(v / v.norm(dim=-1, keepdim=True), comb / comb.norm(dim=-1, keepdim=True))


# ------------------------------------------------------------------------------------------------ schedule


def test_sigmas_match_the_pipeline_scheduler(adapter: QwenImageAdapter) -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    assert isinstance(adapter, ModelAdapter) and adapter.family == "qwen_image" and not adapter.edit
    assert adapter.resolution == 64 and adapter.image_seq_len() == 16  # (64 / 16)^2 tokens
    cfg = adapter.pipe.scheduler.config
    for res in (64, 512, 1328):
        expected = calculate_shift(adapter.image_seq_len(res), cfg.base_image_seq_len, cfg.max_image_seq_len,
                                   cfg.base_shift, cfg.max_shift)
        assert adapter.mu(res) == pytest.approx(expected)
    for n in (4, 10):
        s = adapter.sigmas(n)
        assert s.dtype == torch.float32 and s.shape == (n + 1,) and s[0] == 1.0 and s[-1] == 0.0
        assert torch.all(s[1:] < s[:-1]) and s[-2].item() == pytest.approx(0.02)  # shift_terminal
    s64 = adapter.sigmas(6)
    adapter.resolution = 512
    s512 = adapter.sigmas(6)
    assert torch.all(s512[1:-2] > s64[1:-2])  # more tokens -> larger shift
    adapter.resolution = 64
    assert torch.equal(adapter.sigmas(6), s64)
    adapter.sigmas(6)[0] = 5.0  # callers get a copy
    assert adapter.sigmas(6)[0] == 1.0
    with pytest.raises(ValueError):
        adapter.resolution = 72
    # the pipeline's own schedule for a 3-step 64 px call
    with torch.no_grad():
        adapter.pipe("a cat", num_inference_steps=3, height=64, width=64, output_type="latent", true_cfg_scale=1.0)
    assert torch.equal(adapter.pipe.scheduler.sigmas, adapter.sigmas(3))


def test_latent_shape_and_decode(adapter: QwenImageAdapter) -> None:
    assert adapter.latent_shape(64) == (16, 8, 8)
    with pytest.warns(UserWarning, match="adapter.resolution = 128"):
        assert adapter.latent_shape(128) == (16, 16, 16)
    with pytest.raises(ValueError):
        adapter.latent_shape(72)
    z = torch.randn(2, 16, 8, 8)
    img = adapter.decode(z)
    assert img.shape == (2, 3, 64, 64) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0 and not img.requires_grad
    # == the pipeline's decode: unpack, z / (1/std) + mean, one-frame VAE decode, postprocess to [0, 1]
    pipe = adapter.pipe
    with torch.no_grad():
        ref = pipe.vae.decode(z[:, :, None] * adapter.latents_std + adapter.latents_mean).sample[:, :, 0]
        ref_pipe = pipe.image_processor.postprocess(ref, output_type="pt")
    torch.testing.assert_close(img, ref_pipe)


def test_encode_prompts_fixed_length_rows(adapter: QwenImageAdapter) -> None:
    c = adapter.encode_prompts(["a cat", "a photo of two dogs in the snow", "a cat"])
    assert set(c) == {"prompt_embeds", "prompt_embeds_mask"}
    assert c["prompt_embeds"].shape == (3, MSL, 32) and c["prompt_embeds_mask"].shape == (3, MSL)
    assert c["prompt_embeds"].dtype == torch.float32 and c["prompt_embeds_mask"].dtype == torch.long
    assert torch.equal(c["prompt_embeds"][0], c["prompt_embeds"][2])
    lens = c["prompt_embeds_mask"].sum(1).tolist()
    assert lens[0] < lens[1] <= MSL and not c["prompt_embeds"][0, lens[0]:].any()
    # == the pipeline's encode_prompt (template prefix dropped), whatever the batch
    pe, mask = adapter.pipe.encode_prompt(["a cat"], device="cpu", max_sequence_length=MSL)
    assert mask is None and pe.shape[1] == lens[0]
    torch.testing.assert_close(c["prompt_embeds"][:1, : lens[0]], pe, rtol=1e-5, atol=1e-6)
    long = adapter.encode_prompts(["word " * 100])
    assert long["prompt_embeds_mask"].all()  # truncated to max_sequence_length


# ------------------------------------------------------------------------------------------------ velocity


def test_velocity_equals_transformer_call(adapter: QwenImageAdapter, inputs) -> None:
    x, sigma, cond, _ = inputs
    calls, h = _record_calls(adapter.transformer)
    try:
        with torch.no_grad():
            v = adapter.velocity(x, sigma, cond, 1.0)
    finally:
        h.remove()
    assert [c["rows"] for c in calls] == [2] and torch.equal(calls[0]["timestep"], sigma)  # timestep = sigma
    n = int(cond["prompt_embeds_mask"].sum(1).max())
    assert calls[0]["text"] == n  # all-padding columns dropped
    with torch.no_grad():
        ref = adapter.transformer(
            hidden_states=pack_latents(x),
            encoder_hidden_states=cond["prompt_embeds"][:, :n],
            encoder_hidden_states_mask=cond["prompt_embeds_mask"][:, :n],
            timestep=sigma,
            img_shapes=[[(1, 4, 4)]] * 2,
        ).sample
        # padding never changes the image tokens: the full-length call agrees
        full = adapter.transformer(
            hidden_states=pack_latents(x), encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=cond["prompt_embeds_mask"], timestep=sigma, img_shapes=[[(1, 4, 4)]] * 2,
        ).sample
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.equal(v, unpack_latents(ref, 8, 8))
    torch.testing.assert_close(unpack_latents(full, 8, 8), v, rtol=1e-5, atol=1e-5)
    seen: list[int] = []

    def wrapped(**kw):
        seen.append(1)
        return adapter.transformer(**kw)

    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 1.0, model=wrapped), v) and seen == [1]


def test_true_cfg_is_one_2b_call_with_norm_rescaling(adapter: QwenImageAdapter, inputs) -> None:
    x, sigma, cond, neg = inputs
    calls, h = _record_calls(adapter.transformer)
    try:
        with torch.no_grad():
            v = adapter.velocity(x, sigma, cond, 4.0, negative=neg)
            v_c = adapter.velocity(x, sigma, cond, 1.0)
            v_u = adapter.velocity(x, sigma, {k: t.expand(2, *t.shape[1:]) for k, t in neg.items()}, 1.0)
    finally:
        h.remove()
    assert [c["rows"] for c in calls] == [4, 2, 2]
    assert calls[0]["mask"] is not None  # negative and positive rows differ in length
    expected = unpack_latents(rescaled_cfg(pack_latents(v_u), pack_latents(v_c), 4.0), 8, 8)
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        adapter.velocity(x, sigma, cond, 4.0)


def test_euler_loop_equals_the_pipeline(adapter: QwenImageAdapter, inputs) -> None:
    """A 3-step QwenImagePipeline call with true CFG (negative " ") == our Euler loop on the same initial latents."""
    x, _, cond, neg = inputs
    x0 = x[:1]
    with torch.no_grad():
        out = adapter.pipe("a photo of a cat", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=3,
                           latents=pack_latents(x0), height=64, width=64, output_type="latent",
                           max_sequence_length=MSL).images
        s, lat = adapter.sigmas(3), x0
        for i in range(3):
            v = adapter.velocity(lat, s[i].expand(1), {k: t[:1] for k, t in cond.items()}, 4.0, negative=neg)
            lat = lat + (s[i + 1] - s[i]) * v
    torch.testing.assert_close(pack_latents(lat), out, rtol=1e-5, atol=1e-5)


def test_velocity_bf16_autocast_is_deterministic_fp32(tiny_qwen_dir: Path, inputs) -> None:
    x, sigma, cond, neg = inputs
    a = QwenImageAdapter.from_pretrained(tiny_qwen_dir, mixed_precision="bf16", max_sequence_length=MSL,
                                         transformer_dtype=torch.bfloat16)
    a.add_lora(4, 8)
    lora = dict(a._trainable_named())
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for n, p in a.transformer.named_parameters() if ".lora_" not in n)
    perturb(a.trainable_parameters(), 0.05)
    with torch.no_grad():
        v1, v2 = (a.velocity(x, sigma, cond, 4.0, negative=neg) for _ in range(2))
    assert v1.dtype == torch.float32 and torch.equal(v1, v2) and torch.isfinite(v1).all()
    a.velocity(x, sigma, cond, 4.0, negative=neg).square().mean().backward()
    assert all(p.grad is not None for p in a.trainable_parameters())


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_targets_init_and_reference(adapter: QwenImageAdapter, inputs) -> None:
    x, sigma, cond, neg = inputs
    with torch.no_grad():
        v0 = adapter.velocity(x, sigma, cond, 4.0, negative=neg)
    adapter.add_lora(rank=4, alpha=8)  # default targets = upstream's Qwen-Image list
    assert set(adapter.lora_config.target_modules) == set(QWEN_IMAGE_LORA_TARGETS)
    names = [n for n, p in adapter.transformer.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert sorted(names) == sorted(adapter.trainable_state_dict())
    for target in QWEN_IMAGE_LORA_TARGETS:  # every default target matched in the first block
        assert any(n.startswith("transformer_blocks.0.") and f".{target}.lora_A." in n for n in names), target
    # the last block's text-stream outputs never reach the velocity: their LoRA is frozen, not trained
    unused = tuple(f"transformer_blocks.1.{m}" for m in ("attn.to_add_out.", "attn.add_q_proj.", "txt_mlp."))
    frozen = [n for n, p in adapter.transformer.named_parameters() if ".lora_" in n and not p.requires_grad]
    assert frozen and all(n.startswith(unused) for n in frozen) and not any(n.startswith(unused) for n in names)
    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 4.0, negative=neg), v0)  # B = 0 at init
    perturb(adapter.trainable_parameters())
    with torch.no_grad():
        v1 = adapter.velocity(x, sigma, cond, 4.0, negative=neg)
        with adapter.reference():
            v_ref = adapter.velocity(x, sigma, cond, 4.0, negative=neg)
    assert (v1 - v0).abs().max() > 1e-3 and torch.equal(v_ref, v0)
    assert all(p.requires_grad for p in adapter.trainable_parameters())  # restored after reference()
    adapter.velocity(x, sigma, cond, 4.0, negative=neg).square().mean().backward()
    assert all(p.grad is not None for p in adapter.trainable_parameters())
    assert all(p.grad is None for n, p in adapter.transformer.named_parameters() if ".lora_" not in n)


def test_full_finetune_reference_and_unused_parameters(adapter: QwenImageAdapter, inputs) -> None:
    x, sigma, cond, neg = inputs
    a = QwenImageAdapter.from_pipeline(adapter.pipe, max_sequence_length=MSL, resolution=64, full_finetune=True)
    params = a.trainable_parameters()
    assert 0 < len(params) < len(list(a.transformer.parameters()))  # minus the last block's text-stream outputs
    with torch.no_grad():
        v0 = a.velocity(x, sigma, cond, 4.0, negative=neg)
    a.velocity(x, sigma, cond, 4.0, negative=neg).square().mean().backward()
    assert all(p.grad is not None and p.grad.any() for p in params)  # every trainable parameter learns (DDP-safe)
    assert all(p.grad is None for p in a.transformer.parameters() if not p.requires_grad)
    perturb(params)
    with torch.no_grad():
        with a.reference():
            v_ref = a.velocity(x, sigma, cond, 4.0, negative=neg)
        v1 = a.velocity(x, sigma, cond, 4.0, negative=neg)
    assert torch.equal(v_ref, v0) and (v1 - v0).abs().max() > 1e-3


def test_trainable_state_roundtrip_and_save_pretrained(adapter: QwenImageAdapter, inputs, tmp_path: Path,
                                                       tiny_qwen_dir: Path) -> None:
    from diffusers import QwenImagePipeline

    x, sigma, cond, neg = inputs
    adapter.add_lora(4, 16)
    perturb(adapter.trainable_parameters(), 0.1)
    state = adapter.trainable_state_dict()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    with torch.no_grad():
        v_lora = adapter.velocity(x, sigma, cond, 4.0, negative=neg)
    fresh = QwenImageAdapter.from_pretrained(tiny_qwen_dir, max_sequence_length=MSL)
    fresh.add_lora(4, 16)
    fresh.load_trainable_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.velocity(x, sigma, cond, 4.0, negative=neg), v_lora)

    adapter.save_pretrained(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    pipe = QwenImagePipeline.from_pretrained(tmp_path / "out")
    reloaded = QwenImageAdapter.from_pipeline(pipe, max_sequence_length=MSL, resolution=64)
    assert not any("lora" in n for n, _ in reloaded.transformer.named_parameters())
    with torch.no_grad():
        v_merged = reloaded.velocity(x, sigma, cond, 4.0, negative=neg)
        assert torch.equal(reloaded.encode_prompts(["two dogs"])["prompt_embeds"], cond["prompt_embeds"][1:])
    assert (v_merged - v_lora).abs().max() < 1e-4  # merged W + BA vs. unmerged: fp32 rounding only
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").is_file()


# ------------------------------------------------------------------------------------------ rollout, loading


def test_rollout_noise_zero_equals_ode(adapter: QwenImageAdapter, inputs) -> None:
    """The stochastic step with noise_level 0 is the Euler step: a full-window rollout at noise 0 ends where the
    ODE rollout does, and both equal our Euler loop on the adapter's CFG velocity."""
    from flowgrpo.rollout import PromptEncoder, initial_noise, rollout
    from flowgrpo.schedule import full_window

    _, _, _, neg = inputs
    cond = PromptEncoder(adapter)(["a cat", "a dog"])
    sig = adapter.sigmas(4)
    kw = dict(sigmas=sig, guidance_scale=4.0, sde_type="sde", sample_seeds=[3, 4], resolution=64, decode=False)
    ode, *_ = rollout(adapter, cond, neg, window=None, noise_level=0.7, **kw)
    sde0, lat, _, _ = rollout(adapter, cond, neg, window=full_window(4), noise_level=0.0, **kw)
    assert lat.shape[2:] == (16, 8, 8)
    torch.testing.assert_close(sde0, ode, rtol=0, atol=1e-6)
    x = initial_noise((16, 8, 8), [s ^ 0x5EED for s in (3, 4)], torch.device("cpu"))
    with torch.no_grad():
        for i in range(4):
            x = x + (sig[i + 1] - sig[i]) * adapter.velocity(x, sig[i].expand(2), cond, 4.0, negative=neg)
    torch.testing.assert_close(ode, x, rtol=0, atol=1e-6)
    noisy, *_ = rollout(adapter, cond, neg, window=full_window(4), noise_level=0.7, **kw)
    assert (noisy - ode).abs().max() > 1e-3


def test_load_adapter_with_registered_family(tiny_qwen_dir: Path) -> None:
    assert loading.ADAPTERS["qwen_image"] is QwenImageAdapter
    a = loading.load_adapter("qwen_image", str(tiny_qwen_dir), max_sequence_length=MSL, needs_reference=False)
    assert isinstance(a, QwenImageAdapter) and a.max_sequence_length == MSL and a.resolution == 64
