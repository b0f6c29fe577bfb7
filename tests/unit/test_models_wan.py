"""Wan2.1 adapter and the offline tiny Wan (32 px x 5 frames, CPU, offline): the invariants every adapter holds (as
test_models_sd3 / test_models_flux) on 5-D video latents [B, C, F, H, W], plus Wan's own conventions - timestep =
1000 sigma, UniPC flow sigmas with static shift 3, CFG as one 2B call, latents_mean/std normalisation, 4k + 1
frames -> k + 1 latent frames, decode to [B, F, 3, H, W]."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.unit.adapter_checks import perturb, velocity_inputs  # noqa: E402
from flowgrpo.models import ModelAdapter, loading, tiny_wan  # noqa: E402
from flowgrpo.models.tiny import TINY_MARKER  # noqa: E402
from flowgrpo.models.wan import DEFAULT_NUM_FRAMES, WAN_LORA_TARGETS, WanAdapter, wan_sigmas  # noqa: E402

MSL = 16  # max_sequence_length: short keeps the tests fast
RES = 32


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_wan.make_tiny_wan_model(tmp_path_factory.mktemp("models") / "tiny_wan", seed=0)


@pytest.fixture
def adapter(tiny_wan_dir: Path) -> WanAdapter:
    return WanAdapter.from_pretrained(tiny_wan_dir, max_sequence_length=MSL)


@pytest.fixture
def inputs(adapter: WanAdapter):
    return velocity_inputs(adapter, RES)


# ---------------------------------------------------------------------------------------------- tiny model


def test_tiny_wan_loads_offline_and_is_cached_once(tiny_wan_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    info = json.loads((tiny_wan_dir / TINY_MARKER).read_text())
    assert info["family"] == "wan" and info["resolution"] == RES and info["num_frames"] == 5
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    assert isinstance(pipe.transformer, WanTransformer3DModel) and isinstance(pipe.vae, AutoencoderKLWan)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.scheduler.config.flow_shift == 3.0
    assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model
    assert pipe.vae.config.z_dim == pipe.transformer.config.in_channels == len(pipe.vae.config.latents_mean) == 16
    text = "A Photo of a Cat, 3 dogs!"
    ids = pipe.tokenizer(text).input_ids
    assert pipe.tokenizer.unk_token_id not in ids and pipe.tokenizer.decode(ids, skip_special_tokens=True) == text
    # deterministic weights; cached once by hash
    a, b = tiny_wan.build_tiny_wan_pipeline(seed=0), tiny_wan.build_tiny_wan_pipeline(seed=1)
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(sa[k], v) for k, v in pipe.transformer.state_dict().items())
    assert not all(torch.equal(sa[k], sb[k]) for k in sa)
    path = tiny_wan.cached_tiny_wan_model("tiny", cache_dir=tmp_path)
    assert path.name.startswith("wan-tiny-") and [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.setattr(tiny_wan, "make_tiny_wan_model", lambda *a, **k: pytest.fail("rebuilt"))
    assert tiny_wan.cached_tiny_wan_model("tiny", cache_dir=tmp_path) == path
    assert loading.resolve_model_path("tiny-wan", cache_dir=tmp_path) == path
    with pytest.raises(ValueError, match="tiny"):
        tiny_wan.get_wan_spec("huge")


# ------------------------------------------------------------------------------------------------ geometry


def test_latent_shape_frames_and_decode(adapter: WanAdapter) -> None:
    assert isinstance(adapter, ModelAdapter) and adapter.family == "wan"
    assert adapter.num_frames == 5 and adapter.latent_shape(RES) == (16, 2, 4, 4)  # 5 frames -> 2 latent frames
    assert adapter.latent_shape(64) == (16, 2, 8, 8)
    with pytest.raises(ValueError):
        adapter.latent_shape(40)  # not a multiple of 8 x 2
    with pytest.raises(ValueError, match="4k \\+ 1"):
        adapter.num_frames = 8
    adapter.num_frames = 9
    assert adapter.latent_shape(RES) == (16, 3, 4, 4)
    z = torch.randn(2, 16, 3, 4, 4)
    vid = adapter.decode(z)
    assert vid.shape == (2, 9, 3, RES, RES) and vid.dtype == torch.float32 and not vid.requires_grad
    assert 0.0 <= vid.min() and vid.max() <= 1.0 and vid.std() > 0
    # == WanPipeline's decode: z / (1 / std) + mean, VAE, (x / 2 + 0.5), frames first
    vae = adapter.pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        ref = vae.decode(z / (1.0 / std) + mean).sample  # [2, 3, 9, 32, 32]
    torch.testing.assert_close(vid, (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4))
    # without a marker, the clip length is upstream's 33 frames; the constructor argument wins
    assert WanAdapter.from_pipeline(adapter.pipe).num_frames == DEFAULT_NUM_FRAMES == 33
    assert WanAdapter.from_pipeline(adapter.pipe, num_frames=13).latent_shape(RES) == (16, 4, 4, 4)


def test_sigmas_are_wans_flow_schedule(adapter: WanAdapter) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    for n in (4, 20):
        s = adapter.sigmas(n)
        assert s.dtype == torch.float32 and s.shape == (n + 1,) and s[0] == 1.0 and s[-1] == 0.0
        assert torch.all(s[1:] < s[:-1])
        # the pipeline's UniPC flow sigmas, except UniPC's 1 - 1e-6 nudge of the first one
        uni = UniPCMultistepScheduler.from_config(adapter.pipe.scheduler.config)
        uni.set_timesteps(n)
        torch.testing.assert_close(s[1:], uni.sigmas[1:], rtol=0, atol=0)
        assert abs(float(uni.sigmas[0]) - 1.0) < 1e-5
        # shift(t) = 3 t / (1 + 2 t) on t = linspace(1, 1/1000, n + 1)[:-1]
        t = torch.linspace(1.0, 1e-3, n + 1, dtype=torch.float64)[:-1]
        torch.testing.assert_close(s[:-1].double(), 3 * t / (1 + 2 * t), rtol=1e-6, atol=1e-7)
        # a FlowMatchEuler scheduler with shift 3 given the base sigmas sets the same schedule
        euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        euler.set_timesteps(sigmas=t.numpy())
        torch.testing.assert_close(euler.sigmas, s, rtol=1e-6, atol=1e-7)
    assert torch.equal(wan_sigmas(4, 3.0), adapter.sigmas(4))
    adapter.sigmas(4)[0] = 5.0  # callers get a copy
    assert adapter.sigmas(4)[0] == 1.0


def test_encode_prompts(adapter: WanAdapter) -> None:
    c = adapter.encode_prompts(["a cat", "a dog", "a cat"])
    assert set(c) == {"prompt_embeds"} and c["prompt_embeds"].shape == (3, MSL, 32)
    pe = c["prompt_embeds"]
    assert pe.dtype == torch.float32 and not pe.requires_grad
    assert torch.equal(pe[0], pe[2]) and not torch.equal(pe[0], pe[1])
    ref, neg = adapter.pipe.encode_prompt(["a cat"], do_classifier_free_guidance=False, max_sequence_length=MSL)
    assert neg is None and torch.equal(pe[:1], ref)
    n_tok = len(adapter.pipe.tokenizer("a cat").input_ids)
    assert pe[0, :n_tok].abs().sum() > 0 and not pe[0, n_tok:].any()  # zeroed after the prompt's tokens


# ------------------------------------------------------------------------------------------------ velocity


def test_velocity_equals_transformer_and_cfg_is_one_2b_call(adapter: WanAdapter, inputs) -> None:
    x, sigma, cond, neg = inputs
    calls: list[tuple[int, torch.Tensor]] = []
    h = adapter.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append((kw["hidden_states"].shape[0], kw["timestep"])), with_kwargs=True)
    try:
        with torch.no_grad():
            v1 = adapter.velocity(x, sigma, cond, 1.0)
            v = adapter.velocity(x, sigma, cond, 4.5, negative=neg)
            v_u = adapter.velocity(x, sigma, {k: t.expand(2, *t.shape[1:]) for k, t in neg.items()}, 1.0)
            ref = adapter.transformer(hidden_states=x, timestep=1000 * sigma,
                                      encoder_hidden_states=cond["prompt_embeds"]).sample
    finally:
        h.remove()
    assert [r for r, _ in calls] == [2, 4, 2, 2]  # CFG: ONE call on [negative; positive]
    torch.testing.assert_close(calls[0][1], 1000 * sigma)  # timestep = 1000 sigma
    assert v1.shape == x.shape and v1.dtype == torch.float32 and torch.equal(v1, ref)
    torch.testing.assert_close(v, v_u + 4.5 * (v1 - v_u), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        adapter.velocity(x, sigma, cond, 4.5)


def test_euler_step_equals_diffusers_scheduler_step(adapter: WanAdapter, inputs) -> None:
    """Our ODE step on the adapter's velocity == FlowMatchEulerDiscreteScheduler.step on Wan's sigmas, over a 3-step
    CFG trajectory (WanPipeline's own UniPC solver is multistep, so the per-step comparison uses the Euler scheduler
    holding the same sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowgrpo.sde import ode_step

    x, _, cond, neg = inputs
    s = adapter.sigmas(3)
    sched = FlowMatchEulerDiscreteScheduler(shift=adapter.flow_shift)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1e-3, 4, dtype=torch.float64)[:-1].numpy())
    torch.testing.assert_close(sched.sigmas, s)
    ours, theirs = x, x
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            v = adapter.velocity(ours, s[i].expand(2), cond, 4.5, negative=neg)
            ours = ode_step(ours, v, s[i], s[i + 1])
            v_t = adapter.velocity(theirs, s[i].expand(2), cond, 4.5, negative=neg)
            theirs = sched.step(v_t, t, theirs, return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_deterministic_fp32(tiny_wan_dir: Path, inputs) -> None:
    x, sigma, cond, _ = inputs
    a = WanAdapter.from_pretrained(tiny_wan_dir, mixed_precision="bf16", max_sequence_length=MSL)
    assert next(a.transformer.parameters()).dtype == torch.float32  # fp32 master weights
    with torch.no_grad():
        v1, v2 = (a.velocity(x, sigma, cond, 1.0) for _ in range(2))
    assert v1.dtype == torch.float32 and torch.equal(v1, v2) and torch.isfinite(v1).all()


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_identity_reference_and_state_roundtrip(adapter: WanAdapter, inputs, tiny_wan_dir: Path) -> None:
    x, sigma, cond, _ = inputs
    with torch.no_grad():
        v0 = adapter.velocity(x, sigma, cond, 1.0)
    adapter.add_lora(rank=4, alpha=8)  # default targets: upstream's attention projections
    assert set(adapter.lora_config.target_modules) == set(WAN_LORA_TARGETS)
    names = [n for n, p in adapter.transformer.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(adapter.trainable_state_dict())
    for attn in ("attn1", "attn2"):  # self- and cross-attention q/k/v/out of every block
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            assert any(f"blocks.1.{attn}.{proj}.lora_A." in n for n in names), (attn, proj)
    assert not any(".ffn." in n for n in names)
    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 1.0), v0)  # B = 0 at init
    perturb(adapter.trainable_parameters())
    with torch.no_grad():
        v1 = adapter.velocity(x, sigma, cond, 1.0)
        with adapter.reference():
            v_ref = adapter.velocity(x, sigma, cond, 1.0)
    assert (v1 - v0).abs().max() > 1e-3 and torch.equal(v_ref, v0)
    assert all(p.requires_grad for p in adapter.trainable_parameters())  # restored after reference()
    adapter.velocity(x, sigma, cond, 1.0).square().mean().backward()
    assert all(p.grad is not None for p in adapter.trainable_parameters())
    # a fresh adapter with the same LoRA layout reproduces the policy from the trainable state
    fresh = WanAdapter.from_pretrained(tiny_wan_dir, max_sequence_length=MSL)
    fresh.add_lora(4, 8)
    fresh.load_trainable_state_dict(adapter.trainable_state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.velocity(x, sigma, cond, 1.0), v1)
    state = adapter.trainable_state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(KeyError):
        fresh.load_trainable_state_dict(state)


def test_full_finetune_reference(tiny_wan_dir: Path, inputs) -> None:
    x, sigma, cond, _ = inputs
    a = WanAdapter.from_pretrained(tiny_wan_dir, max_sequence_length=MSL, full_finetune=True)
    assert len(a.trainable_parameters()) == len(list(a.transformer.parameters()))
    with torch.no_grad():
        v0 = a.velocity(x, sigma, cond, 1.0)
    perturb(a.trainable_parameters())
    with torch.no_grad():
        with a.reference():
            v_ref = a.velocity(x, sigma, cond, 1.0, model=lambda **kw: pytest.fail("reference must use the copy"))
        v1 = a.velocity(x, sigma, cond, 1.0)
    assert torch.equal(v_ref, v0) and (v1 - v0).abs().max() > 1e-3


def test_save_pretrained_merges_lora_and_reloads_as_wan_pipeline(adapter: WanAdapter, inputs, tmp_path: Path,
                                                                 tiny_wan_dir: Path) -> None:
    from diffusers import WanPipeline

    x, sigma, cond, _ = inputs
    adapter.add_lora(4, 16)
    perturb(adapter.trainable_parameters(), 0.1)
    with torch.no_grad():
        v_lora = adapter.velocity(x, sigma, cond, 1.0)
    adapter.save_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 1.0), v_lora)  # the in-memory model is untouched
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    pipe = WanPipeline.from_pretrained(tmp_path / "out")
    reloaded = WanAdapter.from_pipeline(pipe, max_sequence_length=MSL, num_frames=5)
    assert not any("lora" in n for n, _ in reloaded.transformer.named_parameters())
    with torch.no_grad():
        assert (reloaded.velocity(x, sigma, cond, 1.0) - v_lora).abs().max() < 1e-5  # merged: fp32 rounding only
        assert torch.equal(reloaded.decode(x), adapter.decode(x))
    base = WanPipeline.from_pretrained(tiny_wan_dir)  # the diffusers-format LoRA loads into the base pipeline
    base.load_lora_weights(tmp_path / "out" / "lora")
    with torch.no_grad():
        torch.testing.assert_close(WanAdapter.from_pipeline(base, max_sequence_length=MSL).velocity(
            x, sigma, cond, 1.0), v_lora, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ rollout, loading


def test_rollout_noise_zero_equals_ode_on_video(adapter: WanAdapter) -> None:
    """The stochastic step with noise_level 0 is the Euler step: a full-window rollout at noise 0 ends where the
    pure ODE rollout does; the rollout records 5-D latents and decodes clips [B, F, 3, H, W]."""
    from flowgrpo.rollout import PromptEncoder, rollout, to_uint8
    from flowgrpo.schedule import full_window

    cond = PromptEncoder(adapter)(["a cat", "a dog"])
    neg = adapter.encode_prompts([""])
    sig = adapter.sigmas(4)
    kw = dict(sigmas=sig, guidance_scale=4.5, sde_type="sde", sample_seeds=[3, 4], resolution=RES)
    ode, *_ = rollout(adapter, cond, neg, window=None, noise_level=0.7, decode=False, **kw)
    sde0, lat, lps, _ = rollout(adapter, cond, neg, window=full_window(4), noise_level=0.0, decode=False, **kw)
    assert lat.shape == (2, 4, 16, 2, 4, 4) and lps.shape == (2, 3)
    torch.testing.assert_close(sde0, ode, rtol=0, atol=1e-6)
    videos, lat, lps, _ = rollout(adapter, cond, neg, window=full_window(4), noise_level=0.7, **kw)
    assert (lat[:, -1] - ode).abs().max() > 1e-3 and torch.isfinite(lps).all()
    assert videos.shape == (2, 5, 3, RES, RES)
    u8 = to_uint8(videos)
    assert u8.shape == (2, 5, RES, RES, 3) and u8.dtype.name == "uint8"


def test_load_adapter_registered(tiny_wan_dir: Path) -> None:
    from flowgrpo.config import FAMILIES

    assert "wan" in FAMILIES and loading.ADAPTERS["wan"] is WanAdapter
    a = loading.load_adapter("wan", str(tiny_wan_dir), max_sequence_length=MSL, needs_reference=False)
    assert isinstance(a, WanAdapter) and a.max_sequence_length == MSL and a.num_frames == 5
