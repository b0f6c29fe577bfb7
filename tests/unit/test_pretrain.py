"""Pretraining of the shapes-world base model (flowgrpo.models.pretrain) on micro settings (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowgrpo.models import pretrain as P
from flowgrpo.models import tiny

#: a few steps of each stage on single objects: enough to exercise every code path in seconds
MICRO = P.PretrainSettings(tags=("single_object",), vae_steps=3, vae_batch_size=4, vae_crop=32, steps=40,
                           batch_size=8, dataset_size=64, warmup_steps=2, lr=3e-3, ema_decay=0.5)


@pytest.fixture(autouse=True)
def _one_thread():
    """Thread count is part of determinism (reduction order); the tests pin it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def micro_run():
    torch.set_num_threads(1)
    return P.pretrain_pipeline(MICRO)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------- tokenizers


def test_shapes_spec_tokenizes_every_prompt_word_as_one_token():
    spec = tiny.get_spec("shapes")
    assert set(P.shapes_vocabulary()) == set(spec.vocab_words) == set(tiny.SHAPES_WORDS)
    clip = tiny.build_clip_tokenizer(spec.clip_max_length, spec.vocab_words)
    t5 = tiny.build_t5_tokenizer(spec.vocab_words)
    for w in spec.vocab_words:
        assert len(clip(w).input_ids) == 3, w  # bos, word, eos
        assert len(t5(w).input_ids) == 2, w  # word, eos
    from flowgrpo.eval import shapes as S

    longest = max((r["prompt"] for t in P.ALL_TAGS for r in S.all_prompts(t)), key=len)
    assert len(clip(longest).input_ids) <= spec.clip_max_length
    assert len(t5(longest).input_ids) <= P.PretrainSettings().max_sequence_length


def test_default_tokenizers_and_existing_cache_keys_unchanged():
    # adding TinySpec fields must not move the cached directories of the older specs
    assert tiny.tiny_cache_key("tiny") == "tiny-c685f8b58d9d"
    assert tiny.tiny_cache_key("bench_cpu") == "bench_cpu-1ee937864f1c"
    clip, t5 = tiny.build_clip_tokenizer(), tiny.build_t5_tokenizer()  # ids as before the extra-words option
    assert clip("a photo of a cat").input_ids == [512, 353, 607, 672, 353, 657, 513] and len(clip) == 675
    assert t5("a red cat").input_ids == [68, 85, 261, 260, 70, 257, 276, 1] and len(t5) == 382


# ------------------------------------------------------------------------------------------------ sigmas


def test_training_sigmas_follow_the_sampler_shift():
    """Pretraining noise levels use the scheduler's own shift: the sampler's sigmas (SD3Adapter.sigmas) are
    shift(u) on a uniform grid of u, and sample_sigmas draws shift(u) with u uniform / logit-normal, so
    P(sigma <= sampler sigma_i) = u_i exactly: training covers the sampler's noise levels the way SD3's does."""
    from flowgrpo.models.sd3 import SD3Adapter
    from flowgrpo.schedule import shifted_sigmas

    pipe = tiny.build_tiny_pipeline("shapes")
    shift = float(pipe.scheduler.config.shift)
    adapter = SD3Adapter(pipe, needs_reference=False)
    sig = adapter.sigmas(10)
    assert torch.allclose(sig, shifted_sigmas(10, shift), atol=1e-6)
    s_i = sig[1:-1].double()
    u_i = s_i / (shift - (shift - 1) * s_i)  # the inverse of shift(u) = shift u / (1 + (shift - 1) u)
    assert torch.allclose(u_i[:-1] - u_i[1:], (u_i[0] - u_i[1]).expand(len(u_i) - 1), atol=1e-5)  # uniform grid
    draws = P.sample_sigmas(40000, MICRO.replace(timestep_sampling="uniform"), shift,
                            torch.Generator().manual_seed(0)).double()
    assert 0 < float(draws.min()) and float(draws.max()) < 1
    cdf = torch.stack([(draws <= s).double().mean() for s in s_i])
    assert torch.allclose(cdf, u_i, atol=0.01)
    ln = P.sample_sigmas(40000, MICRO, shift, torch.Generator().manual_seed(0))  # logit-normal: median u = 0.5
    assert abs(float(ln.median()) - shift * 0.5 / (1 + (shift - 1) * 0.5)) < 0.01


# ------------------------------------------------------------------------------------------------ training


def test_vae_stage_sets_latent_statistics(micro_run):
    pipe, info = micro_run
    assert info["vae_steps_done"] == MICRO.vae_steps
    cfg = pipe.vae.config
    assert cfg.scaling_factor == pytest.approx(info["vae_scaling_factor"])
    rows = P._Rows(MICRO.tags, MICRO.holdout).draw(64, np.random.default_rng([MICRO.seed, 2]))
    lat = P.encode_latents(pipe.vae, P.render_images(rows, MICRO.resolution, (MICRO.seed, 2, 0), True))
    assert abs(float(lat.mean())) < 0.3 and 0.7 < float(lat.std()) < 1.3  # ~standardised, like SD3's VAE config


def test_flow_loss_goes_down():
    """The rectified-flow loss on a fixed batch (fixed noise and sigmas) falls with training."""
    torch.manual_seed(0)
    s = MICRO.replace(vae_steps=0, steps=60)
    pipe = P.build_shapes_pipeline(s)
    rows = P._Rows(s.tags, s.holdout).draw(16, np.random.default_rng(123))
    x0 = P.encode_latents(pipe.vae, P.render_images(rows, s.resolution, (9,), True))
    gen = torch.Generator().manual_seed(5)
    sig = P.sample_sigmas(16, s, float(pipe.scheduler.config.shift), gen)
    noise = torch.randn(x0.shape, generator=gen)
    prompts = [r["prompt"] for r in rows]
    with torch.no_grad():
        before = float(P.flow_loss(pipe, x0, prompts, sig, noise, s.max_sequence_length))
    stats = P.train_flow(pipe, s)
    with torch.no_grad():
        after = float(P.flow_loss(pipe, x0, prompts, sig, noise, s.max_sequence_length))
    assert after < 0.7 * before, (before, after)
    curve = stats["flow_loss_curve"]
    assert np.mean(curve[-5:]) < np.mean(curve[:5])
    assert not any(p.requires_grad for p in pipe.transformer.parameters())  # handed back frozen, eval mode
    assert not pipe.transformer.training


def test_deterministic_given_seed(micro_run):
    pipe_a, info_a = micro_run
    pipe_b, info_b = P.pretrain_pipeline(MICRO)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_3"):
        sa, sb = _state(getattr(pipe_a, name)), _state(getattr(pipe_b, name))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert info_a["flow_loss_curve"] == info_b["flow_loss_curve"]
    pipe_c, _ = P.pretrain_pipeline(MICRO.replace(seed=1))
    sa, sc = _state(pipe_a.transformer), _state(pipe_c.transformer)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_budget_stops_early():
    pipe, info = P.pretrain_pipeline(MICRO.replace(steps=10_000), budget_s=0.0)
    assert info["stopped_early"] is True
    assert info["flow_steps_done"] == 0 and info["vae_steps_done"] == 0


# -------------------------------------------------------------------------------------------------- caching


def test_cache_key_changes_with_settings():
    k = P.cache_key(MICRO, "micro")
    assert k == P.cache_key(P.PretrainSettings(**{**MICRO.to_dict(), "tags": tuple(MICRO.tags)}), "micro")
    assert k.startswith("shapes-micro-")
    changed = {P.cache_key(MICRO.replace(**c), "micro") for c in
               ({"seed": 1}, {"steps": 41}, {"lr": 1e-3}, {"vae_steps": 4}, {"tags": ("colors",)},
                {"max_sequence_length": 12})}
    assert k not in changed and len(changed) == 6
    assert P.cache_key(MICRO, "other") != k
    assert P.cache_key(P.PRESETS["default"], "default") != P.cache_key(P.PRESETS["small"], "small")


def test_cached_model_builds_once_and_resolves(tmp_path, monkeypatch):
    from flowgrpo.models.loading import resolve_model_path

    calls = []
    real = P.pretrain_pipeline

    def counting(settings, budget_s=None, log=None):
        calls.append(settings)
        return real(settings, budget_s=budget_s, log=log)

    monkeypatch.setattr(P, "pretrain_pipeline", counting)
    monkeypatch.setitem(P.PRESETS, "micro", MICRO)
    first = resolve_model_path("shapes:micro", cache_dir=tmp_path)
    again = P.cached_shapes_model("micro", cache_dir=tmp_path)
    assert first == again and len(calls) == 1
    assert first.name == P.cache_key(MICRO, "micro") and first.parent == tmp_path
    info = json.loads((first / P.PRETRAIN_MARKER).read_text())
    assert info["cache_key"] == first.name and info["settings"]["steps"] == MICRO.steps
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the temp build dir was renamed away


def test_saved_dir_loads_with_load_adapter_and_samples(tmp_path):
    from flowgrpo.bench.shapes import generate
    from flowgrpo.models import load_adapter

    out = P.pretrain_shapes(tmp_path / "m", settings=MICRO, budget_s=None, log=None)
    info = P.read_info(out)
    assert (out / "model_index.json").is_file() and info["max_sequence_length"] == 16
    adapter = load_adapter("sd3", str(out), max_sequence_length=info["max_sequence_length"], needs_reference=False)
    assert adapter.latent_shape(64) == (8, 16, 16)
    assert adapter.scaling_factor == pytest.approx(info["vae_scaling_factor"])
    cond = adapter.encode_prompts(["a photo of a red circle"])
    assert cond["prompt_embeds"].shape == (1, 16 + 16, 64)  # 16 CLIP + 16 T5 tokens
    images = generate(adapter, ["a photo of a red circle", "a photo of two blue squares"], resolution=64,
                      num_steps=4, guidance_scale=3.0, seeds=[0, 1])
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8


def test_settings_are_validated():
    with pytest.raises(ValueError, match="resolution"):
        P.PretrainSettings(resolution=70)
    with pytest.raises(ValueError, match="tags"):
        P.PretrainSettings(tags=("nope",))
    with pytest.raises(ValueError, match="preset"):
        P.get_preset("nope")


def test_cli_writes_a_loadable_model_and_prints_its_info(tmp_path, monkeypatch, capsys):
    from flowgrpo.cli import main

    monkeypatch.setitem(P.PRESETS, "micro", MICRO)
    out = tmp_path / "base"
    assert main(["pretrain-shapes", str(out), "--preset", "micro", "--seed", "3", "--steps", "5",
                 "--budget-s", "0"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["out_dir"] == str(out) and info["flow_steps_done"] == 5 and info["stopped_early"] is False
    saved = P.read_info(out)
    assert saved["settings"]["seed"] == 3 and saved["settings"]["steps"] == 5 and saved["budget_s"] is None
    assert (out / "transformer").is_dir() and (out / "model_index.json").is_file()


@pytest.mark.parametrize("layout", ["canonical", "grid"])
def test_pretraining_layouts_draw_what_the_caption_says(layout):
    """The training images of every tag satisfy their caption (the detector + GenEval rules judge them
    strictly correct), so the base model is never taught a wrong binding, count or relation."""
    from flowgrpo.eval import shapes as S

    rows = P._Rows(P.ALL_TAGS, "hash").draw(300, np.random.default_rng(11))
    x = P.render_images(rows, 64, (5,), antialias=False, layout=layout)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    verdicts = [S.judge(u8[i], rows[i])["strict_correct"] for i in range(len(rows))]
    assert np.mean(verdicts) >= 0.99, [rows[i]["prompt"] for i, v in enumerate(verdicts) if not v][:5]
    assert {r["tag"] for r in rows} == set(P.ALL_TAGS)


class _PoolVAE(torch.nn.Module):
    """A stand-in AutoencoderKL: encode = ``factor`` x average pooling, decode = nearest upsampling (factor 1: the
    identity)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def encode(self, x):
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.nn.functional.avg_pool2d(x, self.factor)))

    def decode(self, z):
        from types import SimpleNamespace

        return SimpleNamespace(sample=torch.nn.functional.interpolate(z, scale_factor=self.factor))


def test_vae_reconstruction_accuracy_is_the_detector_ceiling():
    s = P.PretrainSettings(antialias=False)
    # a lossless round trip keeps every rendered scene correct; 8x pooling (blocky, colours mixed) loses most
    assert P.vae_reconstruction_accuracy(_PoolVAE(1), s, n=32, split="test", layout="random") == 1.0
    assert P.vae_reconstruction_accuracy(_PoolVAE(8), s, n=32, split="test", layout="random") < 0.5


def test_vae_stage_records_its_reconstruction_ceiling(micro_run):
    _, info = micro_run
    for lay in ("canonical", "random"):
        assert 0.0 <= info[f"vae_recon_accuracy_{lay}"] <= 1.0
