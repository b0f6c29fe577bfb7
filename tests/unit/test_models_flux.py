"""FLUX adapter and the offline tiny FLUX (64 px, CPU, offline): the invariants every adapter holds (as
test_models_sd3), plus FLUX's own conventions - 2x2 latent packing, distilled guidance embedding (one call, no
negative), optional true CFG (one 2B call), resolution-dependent sigma shift, timestep = sigma."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.unit.adapter_checks import perturb, velocity_inputs  # noqa: E402
from flowgrpo.models import ModelAdapter, loading  # noqa: E402
from flowgrpo.models import tiny_flux  # noqa: E402
from flowgrpo.models.flux import (  # noqa: E402
    FLUX_LORA_TARGETS,
    FluxAdapter,
    dynamic_shift_mu,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from flowgrpo.models.tiny import TINY_MARKER  # noqa: E402

MSL = 16  # max_sequence_length: short keeps the tests fast


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_flux.make_tiny_flux_model(tmp_path_factory.mktemp("models") / "tiny_flux", seed=0)


@pytest.fixture
def adapter(tiny_flux_dir: Path) -> FluxAdapter:
    return FluxAdapter.from_pretrained(tiny_flux_dir, max_sequence_length=MSL)


@pytest.fixture
def inputs(adapter: FluxAdapter):
    return velocity_inputs(adapter)


def _record_calls(module):
    """Forward hook recording (rows, guidance, timestep) of every transformer call."""
    calls: list[dict] = []

    def hook(m, args, kwargs, out):
        calls.append({"rows": kwargs["hidden_states"].shape[0], "guidance": kwargs.get("guidance"),
                      "timestep": kwargs["timestep"]})

    return calls, module.register_forward_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------------------------- tiny model


def test_tiny_flux_dir_loads_offline(tiny_flux_dir: Path) -> None:
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    info = json.loads((tiny_flux_dir / TINY_MARKER).read_text())
    assert info["family"] == "flux" and info["spec"] == "tiny" and info["resolution"] == 64
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    assert isinstance(pipe.transformer, FluxTransformer2DModel) and isinstance(pipe.vae, AutoencoderKL)
    tcfg = pipe.transformer.config
    assert tcfg.guidance_embeds and tcfg.in_channels == 4 * pipe.vae.config.latent_channels == 64
    assert tcfg.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert tcfg.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.vae.config.shift_factor == pytest.approx(0.1159)
    text = "A Photo of a Cat, 3 dogs!"
    ids = pipe.tokenizer_2(text).input_ids
    assert pipe.tokenizer_2.unk_token_id not in ids and pipe.tokenizer_2.decode(ids, skip_special_tokens=True) == text
    ids = pipe.tokenizer(text).input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and pipe.tokenizer.unk_token_id not in ids[1:-1]


def test_tiny_flux_is_deterministic_and_cached_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tiny_flux.build_tiny_flux_pipeline(seed=0), tiny_flux.build_tiny_flux_pipeline(seed=0)
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = tiny_flux.build_tiny_flux_pipeline(seed=1).transformer.state_dict()
    assert not all(torch.equal(sa[k], c[k]) for k in sa)

    path = tiny_flux.cached_tiny_flux_model("tiny", cache_dir=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("flux-tiny-") and (path / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dir left behind
    monkeypatch.setattr(tiny_flux, "make_tiny_flux_model", lambda *a, **k: pytest.fail("rebuilt"))
    assert tiny_flux.cached_tiny_flux_model("tiny", cache_dir=tmp_path) == path
    with pytest.raises(ValueError, match="tiny"):
        tiny_flux.get_flux_spec("huge")


# ------------------------------------------------------------------------------------------ latent layout


def test_packing_and_ids_match_diffusers() -> None:
    from diffusers import FluxPipeline

    x = torch.randn(3, 16, 8, 6)
    packed = pack_latents(x)
    assert packed.shape == (3, 12, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 48, 8), x)
    assert torch.equal(latent_image_ids(8, 6), FluxPipeline._prepare_latent_image_ids(1, 4, 3, "cpu", torch.float32))
    with pytest.raises(ValueError):
        pack_latents(torch.randn(1, 16, 7, 8))


# ------------------------------------------------------------------------------------------------ schedule


def test_sigmas_dynamic_shift_from_resolution(adapter: FluxAdapter) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert isinstance(adapter, ModelAdapter) and adapter.family == "flux"
    assert adapter.resolution == 64 and adapter.image_seq_len() == 16  # (64 / 16)^2 tokens
    cfg = adapter.pipe.scheduler.config
    for res in (64, 512, 1024):
        expected = calculate_shift(adapter.image_seq_len(res), cfg.base_image_seq_len, cfg.max_image_seq_len,
                                   cfg.base_shift, cfg.max_shift)
        assert adapter.mu(res) == pytest.approx(expected) == pytest.approx(dynamic_shift_mu((res // 16) ** 2, cfg))
    assert adapter.mu(512) == pytest.approx(0.63) and adapter.mu(1024) == pytest.approx(1.15)
    for n in (6, 28):
        s = adapter.sigmas(n)
        assert s.dtype == torch.float32 and s.shape == (n + 1,) and s[0] == 1.0 and s[-1] == 0.0
        assert torch.all(s[1:] < s[:-1])
    s64 = adapter.sigmas(6)
    adapter.resolution = 512
    s512 = adapter.sigmas(6)
    assert torch.all(s512[1:-1] > s64[1:-1])  # more tokens -> larger shift -> more time at high noise
    # sigma' = e^mu / (e^mu + 1/t - 1) on the base grid t = linspace(1, 1/T, T)
    t = torch.linspace(1.0, 1 / 6, 6, dtype=torch.float64)
    e = torch.exp(torch.tensor(adapter.mu(512), dtype=torch.float64))
    torch.testing.assert_close(s512[:-1].double(), e / (e + 1 / t - 1), rtol=1e-6, atol=1e-6)
    adapter.resolution = 64
    assert torch.equal(adapter.sigmas(6), s64)
    adapter.sigmas(6)[0] = 5.0  # callers get a copy
    assert adapter.sigmas(6)[0] == 1.0
    with pytest.raises(ValueError):
        adapter.resolution = 72
    assert FluxAdapter.from_pipeline(adapter.pipe, resolution=512).sigmas(6).tolist() == s512.tolist()


def test_latent_shape_and_decode(adapter: FluxAdapter) -> None:
    assert adapter.latent_shape(64) == (16, 8, 8)
    with pytest.warns(UserWarning, match="adapter.resolution = 128"):
        assert adapter.latent_shape(128) == (16, 16, 16)
    with pytest.raises(ValueError):
        adapter.latent_shape(72)  # not a multiple of 8 x 2
    z = torch.randn(3, 16, 8, 8)
    img = adapter.decode(z)
    assert img.shape == (3, 3, 64, 64) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0 and not img.requires_grad
    vae = adapter.pipe.vae
    with torch.no_grad():
        ref = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(img, (ref / 2 + 0.5).clamp(0, 1))


def test_encode_prompts(adapter: FluxAdapter) -> None:
    c = adapter.encode_prompts(["a cat", "a dog", "a cat"])
    assert set(c) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert c["prompt_embeds"].shape == (3, MSL, 32) and c["pooled_prompt_embeds"].shape == (3, 32)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in c.values())
    assert torch.equal(c["prompt_embeds"][0], c["prompt_embeds"][2])
    assert not torch.equal(c["prompt_embeds"][0], c["prompt_embeds"][1])
    pe, pooled, text_ids = adapter.pipe.encode_prompt(["a cat"], device="cpu", max_sequence_length=MSL)
    assert torch.equal(c["prompt_embeds"][:1], pe) and torch.equal(c["pooled_prompt_embeds"][:1], pooled)
    assert text_ids.shape == (MSL, 3) and not text_ids.any()  # FLUX text ids: all zero, rebuilt in velocity


# ------------------------------------------------------------------------------------------------ velocity


def test_velocity_distilled_guidance_is_one_call(adapter: FluxAdapter, inputs) -> None:
    x, sigma, cond, neg = inputs
    calls, h = _record_calls(adapter.transformer)
    try:
        with torch.no_grad():
            v = adapter.velocity(x, sigma, cond, 3.5, negative=neg)
            v_no_neg = adapter.velocity(x, sigma, cond, 3.5)
            v1 = adapter.velocity(x, sigma, cond, 1.0)
    finally:
        h.remove()
    assert [c["rows"] for c in calls] == [2, 2, 2]  # no 2B batch: the negative is not used
    assert torch.equal(v, v_no_neg)
    assert calls[0]["guidance"].tolist() == [3.5, 3.5] and calls[2]["guidance"].tolist() == [1.0, 1.0]
    assert torch.equal(calls[0]["timestep"], sigma)  # timestep = sigma (the transformer scales by 1000)
    assert v.shape == x.shape and v.dtype == torch.float32 and (v - v1).abs().max() > 1e-4
    # model= overrides the transformer (e.g. the DDP-wrapped module), called with the same kwargs
    seen: list[int] = []

    def wrapped(**kw):
        seen.append(1)
        return adapter.transformer(**kw)

    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 3.5, model=wrapped), v) and seen == [1]


def test_velocity_equals_transformer_and_pipeline_euler(adapter: FluxAdapter, inputs) -> None:
    x, sigma, cond, _ = inputs
    with torch.no_grad():
        ref = adapter.transformer(
            hidden_states=pack_latents(x),
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            timestep=sigma,
            img_ids=latent_image_ids(8, 8),
            txt_ids=torch.zeros(MSL, 3),
            guidance=torch.full((2,), 3.5),
        ).sample
        assert torch.equal(adapter.velocity(x, sigma, cond, 3.5), unpack_latents(ref, 8, 8))
        # a 3-step FluxPipeline call == our Euler loop on the same initial latents and our sigmas
        x0 = x[:1]
        out = adapter.pipe(
            "a photo of a cat", num_inference_steps=3, guidance_scale=3.5, latents=pack_latents(x0), height=64,
            width=64, output_type="latent", max_sequence_length=MSL,
        ).images
        s = adapter.sigmas(3)
        assert torch.equal(adapter.pipe.scheduler.sigmas, s)  # the pipeline's dynamic-shift schedule
        lat = x0
        for i in range(3):
            v = adapter.velocity(lat, s[i].expand(1), {k: t[:1] for k, t in cond.items()}, 3.5)
            lat = lat + (s[i + 1] - s[i]) * v
    torch.testing.assert_close(pack_latents(lat), out, rtol=1e-5, atol=1e-6)


def test_true_cfg_is_one_2b_call(tiny_flux_dir: Path, inputs) -> None:
    x, sigma, cond, neg = inputs
    a = FluxAdapter.from_pretrained(tiny_flux_dir, max_sequence_length=MSL, true_cfg=True, embedded_guidance=1.0)
    calls, h = _record_calls(a.transformer)
    try:
        with torch.no_grad():
            v = a.velocity(x, sigma, cond, 4.0, negative=neg)
            v_c = a.velocity(x, sigma, cond, 1.0)
            v_u = a.velocity(x, sigma, {k: t.expand(2, *t.shape[1:]) for k, t in neg.items()}, 1.0)
    finally:
        h.remove()
    assert [c["rows"] for c in calls] == [4, 2, 2]
    assert calls[0]["guidance"].tolist() == [1.0] * 4  # the embedding gets embedded_guidance, not the CFG scale
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        a.velocity(x, sigma, cond, 4.0)
    # == FluxPipeline's true CFG (two separate calls per step) over 2 Euler steps
    x0 = x[:1]
    with torch.no_grad():
        out = a.pipe("a photo of a cat", negative_prompt="", true_cfg_scale=4.0, guidance_scale=1.0,
                     num_inference_steps=2, latents=pack_latents(x0), height=64, width=64, output_type="latent",
                     max_sequence_length=MSL).images
        s, lat = a.sigmas(2), x0
        for i in range(2):
            lat = lat + (s[i + 1] - s[i]) * a.velocity(lat, s[i].expand(1), {k: t[:1] for k, t in cond.items()},
                                                         4.0, negative=neg)
    torch.testing.assert_close(pack_latents(lat), out, rtol=1e-5, atol=1e-5)


def test_velocity_bf16_autocast_is_deterministic_fp32(tiny_flux_dir: Path, inputs) -> None:
    x, sigma, cond, _ = inputs
    a = FluxAdapter.from_pretrained(tiny_flux_dir, mixed_precision="bf16", max_sequence_length=MSL)
    assert next(a.transformer.parameters()).dtype == torch.float32
    with torch.no_grad():
        v1, v2 = (a.velocity(x, sigma, cond, 3.5) for _ in range(2))
    assert v1.dtype == torch.float32 and torch.equal(v1, v2)


def test_bf16_frozen_base_with_fp32_lora(tiny_flux_dir: Path, inputs) -> None:
    x, sigma, cond, _ = inputs
    a = FluxAdapter.from_pretrained(tiny_flux_dir, mixed_precision="bf16", max_sequence_length=MSL,
                                    transformer_dtype=torch.bfloat16)
    a.add_lora(4, 8)
    lora = dict(a._trainable_named())
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for n, p in a.transformer.named_parameters() if n not in lora)
    perturb(a.trainable_parameters(), 0.05)
    with torch.no_grad():
        v1, v2 = (a.velocity(x, sigma, cond, 3.5) for _ in range(2))
    assert v1.dtype == torch.float32 and torch.equal(v1, v2) and torch.isfinite(v1).all()
    a.velocity(x, sigma, cond, 3.5).square().mean().backward()
    assert all(p.grad is not None for p in a.trainable_parameters())
    with pytest.raises(ValueError, match="fp32"):
        FluxAdapter.from_pipeline(a.pipe, full_finetune=True, transformer_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_targets_init_and_reference(adapter: FluxAdapter, inputs) -> None:
    x, sigma, cond, _ = inputs
    with torch.no_grad():
        v0 = adapter.velocity(x, sigma, cond, 3.5)
    adapter.add_lora(rank=4, alpha=8)  # default targets = upstream's FLUX list
    assert set(adapter.lora_config.target_modules) == set(FLUX_LORA_TARGETS)
    names = [n for n, p in adapter.transformer.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert sorted(names) == sorted(adapter.trainable_state_dict())
    for target in FLUX_LORA_TARGETS:  # every default target matched in the double-stream blocks
        assert any(n.startswith("transformer_blocks.") and f".{target}.lora_A." in n for n in names), target
    for proj in ("to_q", "to_k", "to_v"):  # ... and the single-stream blocks' q/k/v
        assert any(n.startswith("single_transformer_blocks.") and f".attn.{proj}.lora_A." in n for n in names), proj
    assert adapter.lora_config.lora_alpha == 8 and adapter.lora_config.r == 4
    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 3.5), v0)  # B = 0 at init
    perturb(adapter.trainable_parameters())
    with torch.no_grad():
        v1 = adapter.velocity(x, sigma, cond, 3.5)
        with adapter.reference():
            v_ref = adapter.velocity(x, sigma, cond, 3.5)
        v2 = adapter.velocity(x, sigma, cond, 3.5)
    assert (v1 - v0).abs().max() > 1e-3
    assert torch.equal(v_ref, v0) and torch.equal(v2, v1)
    assert all(p.requires_grad for p in adapter.trainable_parameters())  # restored after reference()
    adapter.velocity(x, sigma, cond, 3.5).square().mean().backward()
    assert all(p.grad is not None for p in adapter.trainable_parameters())
    assert all(p.grad is None for n, p in adapter.transformer.named_parameters() if ".lora_" not in n)
    with pytest.raises(RuntimeError):
        adapter.add_lora(4, 8)


def test_full_finetune_reference(tiny_flux_dir: Path, inputs) -> None:
    x, sigma, cond, _ = inputs
    a = FluxAdapter.from_pretrained(tiny_flux_dir, max_sequence_length=MSL, full_finetune=True)
    assert len(a.trainable_parameters()) == len(list(a.transformer.parameters()))
    with torch.no_grad():
        v0 = a.velocity(x, sigma, cond, 3.5)
    perturb(a.trainable_parameters())
    with torch.no_grad():
        with a.reference():
            v_ref = a.velocity(x, sigma, cond, 3.5, model=lambda **kw: pytest.fail("reference must use the copy"))
        v1 = a.velocity(x, sigma, cond, 3.5)
    assert torch.equal(v_ref, v0) and (v1 - v0).abs().max() > 1e-3
    with pytest.raises(RuntimeError):
        a.add_lora(4, 4)
    b = FluxAdapter.from_pipeline(a.pipe, full_finetune=True, needs_reference=False)
    with pytest.raises(RuntimeError, match="needs_reference"):
        with b.reference():
            pass


def test_trainable_state_save_load_roundtrip(adapter: FluxAdapter, inputs, tmp_path: Path,
                                             tiny_flux_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    x, sigma, cond, _ = inputs
    adapter.add_lora(4, 4)
    perturb(adapter.trainable_parameters())
    state = adapter.trainable_state_dict()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    save_file(state, str(tmp_path / "trainable.safetensors"))
    with torch.no_grad():
        v1 = adapter.velocity(x, sigma, cond, 3.5)
    # a fresh adapter with the same LoRA layout reproduces the policy from the file
    fresh = FluxAdapter.from_pretrained(tiny_flux_dir, max_sequence_length=MSL)
    fresh.add_lora(4, 4)
    with torch.no_grad():
        assert not torch.equal(fresh.velocity(x, sigma, cond, 3.5), v1)
    fresh.load_trainable_state_dict(load_file(str(tmp_path / "trainable.safetensors")))
    with torch.no_grad():
        assert torch.equal(fresh.velocity(x, sigma, cond, 3.5), v1)
    state.pop(next(iter(state)))
    with pytest.raises(KeyError):
        fresh.load_trainable_state_dict(state)


def test_save_pretrained_merges_lora(adapter: FluxAdapter, inputs, tmp_path: Path, tiny_flux_dir: Path) -> None:
    from diffusers import FluxPipeline

    x, sigma, cond, _ = inputs
    adapter.add_lora(4, 16)
    perturb(adapter.trainable_parameters(), 0.1)
    before = {k: t.clone() for k, t in adapter.transformer.state_dict().items()}
    with torch.no_grad():
        v_lora = adapter.velocity(x, sigma, cond, 3.5)
        with adapter.reference():
            assert (adapter.velocity(x, sigma, cond, 3.5) - v_lora).abs().max() > 1e-2
    adapter.save_pretrained(tmp_path / "out")
    after = adapter.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 3.5), v_lora)
    assert all(p.requires_grad for p in adapter.trainable_parameters())

    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    pipe = FluxPipeline.from_pretrained(tmp_path / "out")
    assert isinstance(pipe, FluxPipeline)
    reloaded = FluxAdapter.from_pipeline(pipe, max_sequence_length=MSL)
    assert not any("lora" in n for n, _ in reloaded.transformer.named_parameters())
    with torch.no_grad():
        v_merged = reloaded.velocity(x, sigma, cond, 3.5)
        assert torch.equal(reloaded.encode_prompts(["two dogs"])["prompt_embeds"], cond["prompt_embeds"][1:])
    assert (v_merged - v_lora).abs().max() < 1e-5  # merged W + BA vs. unmerged x W + (x A) B: fp32 rounding only
    lora_cfg = json.loads((tmp_path / "out" / "lora" / "adapter_config.json").read_text())
    assert lora_cfg["lora_alpha"] == 16 and lora_cfg["r"] == 4
    base = FluxPipeline.from_pretrained(tiny_flux_dir)
    base.load_lora_weights(tmp_path / "out" / "lora")
    with torch.no_grad():
        torch.testing.assert_close(FluxAdapter.from_pipeline(base).velocity(x, sigma, cond, 3.5), v_lora,
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ rollout, loading


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_rollout_noise_zero_equals_ode(adapter: FluxAdapter, sde_type: str) -> None:
    """The stochastic step with noise_level 0 is the Euler step: a full-window rollout at noise 0 ends where the
    pure ODE rollout does, and both equal our own Euler loop on the adapter's velocity."""
    from flowgrpo.rollout import PromptEncoder, initial_noise, rollout
    from flowgrpo.schedule import full_window

    cond = PromptEncoder(adapter)(["a cat", "a dog"])
    sig = adapter.sigmas(6)
    kw = dict(sigmas=sig, guidance_scale=3.5, sde_type=sde_type, sample_seeds=[3, 4], resolution=64, decode=False)
    ode, *_ = rollout(adapter, cond, None, window=None, noise_level=0.7, **kw)
    sde0, lat, _, _ = rollout(adapter, cond, None, window=full_window(6), noise_level=0.0, **kw)
    assert lat.shape == (2, 6, 16, 8, 8)
    torch.testing.assert_close(sde0, ode, rtol=0, atol=1e-6)
    x = initial_noise((16, 8, 8), [s ^ 0x5EED for s in (3, 4)], torch.device("cpu"))
    with torch.no_grad():
        for i in range(6):
            x = x + (sig[i + 1] - sig[i]) * adapter.velocity(x, sig[i].expand(2), cond, 3.5)
    torch.testing.assert_close(ode, x, rtol=0, atol=1e-6)
    noisy, *_ = rollout(adapter, cond, None, window=full_window(6), noise_level=0.7, **kw)
    assert (noisy - ode).abs().max() > 1e-3


def test_load_adapter_with_registered_family(tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(loading.ADAPTERS, "flux", FluxAdapter)
    a = loading.load_adapter("flux", str(tiny_flux_dir), max_sequence_length=MSL, needs_reference=False)
    assert isinstance(a, FluxAdapter) and a.max_sequence_length == MSL and a.resolution == 64
