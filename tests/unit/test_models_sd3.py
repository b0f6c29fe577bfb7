"""SD3 adapter, tiny offline models and model resolution (all on the 64 px "tiny" spec, CPU, offline)."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.unit.adapter_checks import perturb, velocity_inputs  # noqa: E402
from flowgrpo.models import ModelAdapter, load_adapter, resolve_model_path  # noqa: E402
from flowgrpo.models import loading, tiny  # noqa: E402
from flowgrpo.models.sd3 import SD3_LORA_TARGETS, SD3Adapter  # noqa: E402

MSL = 16  # max_sequence_length: short keeps the tests fast


@pytest.fixture
def adapter(tiny_model_dir: Path) -> SD3Adapter:
    return SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=MSL)


@pytest.fixture
def inputs(adapter: SD3Adapter):
    return velocity_inputs(adapter)


# ---------------------------------------------------------------------------------------------- tiny models


def test_tiny_dir_loads_offline_and_tokenizers_roundtrip(tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    info = json.loads((tiny_model_dir / tiny.TINY_MARKER).read_text())
    assert info["spec"] == "tiny" and (tiny_model_dir / "model_index.json").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    text = "a photo of a cat, 3 dogs & a café!"
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids[1:-1]
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")  # lowercase
    t5 = pipe.tokenizer_3
    ids = t5("A Photo of a Cat, 3 dogs!").input_ids
    assert t5.unk_token_id not in ids
    assert t5.decode(ids, skip_special_tokens=True) == "A Photo of a Cat, 3 dogs!"
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id


def test_bench_cpu_spec_size() -> None:
    spec = tiny.TINY_SPECS["bench_cpu"]
    assert spec.hidden == 256 and spec.pooled_projection_dim == 2 * spec.clip_projection_dim
    assert spec.resolution == 128 and spec.pos_embed_max_size * spec.patch_size * 8 >= 256
    counts = tiny.param_counts("bench_cpu")
    assert 8e6 <= counts["transformer"] <= 10e6, counts
    assert counts["transformer"] > 3 * sum(v for k, v in counts.items() if k != "transformer")


def test_cached_tiny_model_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny.cached_tiny_model("tiny", cache_dir=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("tiny-") and (path / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dir left behind
    monkeypatch.setattr(tiny, "make_tiny_model", lambda *a, **k: pytest.fail("rebuilt"))
    assert tiny.cached_tiny_model("tiny", cache_dir=tmp_path) == path
    monkeypatch.setenv("FLOWGRPO_CACHE", str(tmp_path / "env"))
    assert tiny.default_cache_root() == tmp_path / "env" / "models"


# ------------------------------------------------------------------------------------------------- schedule


def test_sigmas_match_scheduler(adapter: SD3Adapter) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert isinstance(adapter, ModelAdapter)
    for n in (10, 40):
        sched = FlowMatchEulerDiscreteScheduler.from_config(adapter.pipe.scheduler.config)
        sched.set_timesteps(n)
        s = adapter.sigmas(n)
        assert s.dtype == torch.float32 and s.shape == (n + 1,)
        assert torch.equal(s, sched.sigmas) and torch.equal(s[:-1] * 1000, sched.timesteps)
    expected = torch.tensor([1.0, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465, 0.278, 0.0089, 0.0])
    torch.testing.assert_close(adapter.sigmas(10), expected, rtol=2e-3, atol=5e-5)  # 0.0089 is rounded
    adapter.sigmas(10)[0] = 5.0  # callers get a copy
    assert adapter.sigmas(10)[0] == 1.0


def test_latent_shape_and_decode(adapter: SD3Adapter) -> None:
    assert adapter.latent_shape(64) == (16, 8, 8) and adapter.latent_shape(128) == (16, 16, 16)
    with pytest.raises(ValueError):
        adapter.latent_shape(72)
    img = adapter.decode(torch.randn(3, 16, 8, 8))
    assert img.shape == (3, 3, 64, 64) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0 and not img.requires_grad


def test_encode_prompts(adapter: SD3Adapter) -> None:
    c = adapter.encode_prompts(["a cat", "a dog", "a cat"])
    assert c["prompt_embeds"].shape == (3, 77 + MSL, 32) and c["pooled_prompt_embeds"].shape == (3, 64)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in c.values())
    assert torch.equal(c["prompt_embeds"][0], c["prompt_embeds"][2])
    assert not torch.equal(c["prompt_embeds"][0], c["prompt_embeds"][1])


# ------------------------------------------------------------------------------------------------- velocity


def test_velocity_single_call_and_cfg(adapter: SD3Adapter, inputs) -> None:
    x, sigma, cond, neg = inputs
    rows: list[int] = []
    h = adapter.transformer.register_forward_hook(
        lambda m, a, kw, out: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        v1 = adapter.velocity(x, sigma, cond, 1.0, negative=neg)
        assert rows == [2]
        v = adapter.velocity(x, sigma, cond, 4.5, negative=neg)
        assert rows == [2, 4]
        v_u = adapter.velocity(x, sigma, {k: t.expand(2, *t.shape[1:]) for k, t in neg.items()}, 1.0)
    h.remove()
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v, v_u + 4.5 * (v1 - v_u), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="negative conditioning"):
        adapter.velocity(x, sigma, cond, 4.5)
    with pytest.raises(KeyError, match="pooled_prompt_embeds"):  # every conditioning key needs its negative rows
        adapter.velocity(x, sigma, cond, 4.5, negative={"prompt_embeds": neg["prompt_embeds"]})
    # model= overrides the transformer (e.g. the DDP-wrapped module), called with the same kwargs
    calls: list[int] = []

    def wrapped(**kw):
        calls.append(1)
        return adapter.transformer(**kw)

    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 1.0, model=wrapped), v1) and calls == [1]


def test_velocity_equals_transformer_and_pipeline_euler(adapter: SD3Adapter, inputs) -> None:
    x, sigma, cond, neg = inputs
    with torch.no_grad():
        ref = adapter.transformer(
            hidden_states=x,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            timestep=sigma * 1000,
        ).sample
        assert torch.equal(adapter.velocity(x, sigma, cond, 1.0), ref)
        # a full 2-step CFG pipeline call == our own Euler loop on the same initial latents
        x0 = x[:1]
        out = adapter.pipe(
            "a photo of a cat", num_inference_steps=2, guidance_scale=4.5, latents=x0.clone(), height=64, width=64,
            output_type="latent", max_sequence_length=MSL,
        ).images
        s = adapter.sigmas(2)
        lat = x0
        for i in range(2):
            v = adapter.velocity(lat, s[i].expand(1), {k: t[:1] for k, t in cond.items()}, 4.5, negative=neg)
            lat = lat + (s[i + 1] - s[i]) * v
    torch.testing.assert_close(lat, out, rtol=1e-5, atol=1e-5)


def test_velocity_bf16_autocast_is_deterministic_fp32(tiny_model_dir: Path, inputs) -> None:
    x, sigma, cond, neg = inputs
    a = SD3Adapter.from_pretrained(tiny_model_dir, mixed_precision="bf16", max_sequence_length=MSL)
    assert next(a.transformer.parameters()).dtype == torch.float32
    with torch.no_grad():
        v1, v2 = (a.velocity(x, sigma, cond, 4.5, negative=neg) for _ in range(2))
    assert v1.dtype == torch.float32 and torch.equal(v1, v2)


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_trainable_init_and_reference(adapter: SD3Adapter, inputs) -> None:
    x, sigma, cond, neg = inputs
    with torch.no_grad():
        v0 = adapter.velocity(x, sigma, cond, 4.5, negative=neg)
    adapter.add_lora(rank=4, alpha=8, target_modules=SD3_LORA_TARGETS)
    names = [n for n, p in adapter.transformer.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert sorted(names) == sorted(adapter.trainable_state_dict())
    assert len(adapter.trainable_parameters()) == len(names)
    for target in SD3_LORA_TARGETS:  # every default target matched some module
        assert any(f"{target}.lora_A." in n for n in names), target
    assert adapter.lora_config.lora_alpha == 8 and adapter.lora_config.r == 4
    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 4.5, negative=neg), v0)  # B = 0 at init
    perturb(adapter.trainable_parameters())
    with torch.no_grad():
        v1 = adapter.velocity(x, sigma, cond, 4.5, negative=neg)
        with adapter.reference():
            v_ref = adapter.velocity(x, sigma, cond, 4.5, negative=neg)
        v2 = adapter.velocity(x, sigma, cond, 4.5, negative=neg)
    assert (v1 - v0).abs().max() > 1e-3
    assert torch.equal(v_ref, v0) and torch.equal(v2, v1)
    assert all(p.requires_grad for p in adapter.trainable_parameters())  # restored after reference()
    # gradients flow to LoRA only
    adapter.velocity(x, sigma, cond, 1.0).square().mean().backward()
    assert all(p.grad is not None for p in adapter.trainable_parameters())
    assert all(p.grad is None for n, p in adapter.transformer.named_parameters() if ".lora_" not in n)


def test_full_finetune_reference(tiny_model_dir: Path, inputs) -> None:
    x, sigma, cond, _ = inputs
    a = SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=MSL, full_finetune=True)
    assert len(a.trainable_parameters()) == len(list(a.transformer.parameters()))
    with torch.no_grad():
        v0 = a.velocity(x, sigma, cond, 1.0)
    perturb(a.trainable_parameters())
    with torch.no_grad():
        with a.reference():
            v_ref = a.velocity(x, sigma, cond, 1.0, model=lambda **kw: pytest.fail("reference must use the copy"))
        v1 = a.velocity(x, sigma, cond, 1.0)
    assert torch.equal(v_ref, v0) and (v1 - v0).abs().max() > 1e-3
    with pytest.raises(RuntimeError):
        a.add_lora(4, 4, SD3_LORA_TARGETS)


def test_trainable_state_dict_roundtrip(adapter: SD3Adapter, inputs) -> None:
    x, sigma, cond, _ = inputs
    adapter.add_lora(4, 4, SD3_LORA_TARGETS)
    perturb(adapter.trainable_parameters())
    state = adapter.trainable_state_dict()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    with torch.no_grad():
        v1 = adapter.velocity(x, sigma, cond, 1.0)
        perturb(adapter.trainable_parameters())
        assert not torch.equal(adapter.velocity(x, sigma, cond, 1.0), v1)
    adapter.load_trainable_state_dict(state)
    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 1.0), v1)
    state.pop(next(iter(state)))
    with pytest.raises(KeyError):
        adapter.load_trainable_state_dict(state)


def test_save_pretrained_merges_lora(adapter: SD3Adapter, inputs, tmp_path: Path, tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    x, sigma, cond, neg = inputs
    adapter.add_lora(4, 16, SD3_LORA_TARGETS)
    perturb(adapter.trainable_parameters(), 0.1)
    before = {k: t.clone() for k, t in adapter.transformer.state_dict().items()}
    with torch.no_grad():
        v_lora = adapter.velocity(x, sigma, cond, 4.5, negative=neg)
        with adapter.reference():
            assert (adapter.velocity(x, sigma, cond, 4.5, negative=neg) - v_lora).abs().max() > 1e-2
    adapter.save_pretrained(tmp_path / "out")
    after = adapter.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(adapter.velocity(x, sigma, cond, 4.5, negative=neg), v_lora)
    assert len(adapter.trainable_parameters()) > 0 and all(p.requires_grad for p in adapter.trainable_parameters())

    reloaded = SD3Adapter.from_pipeline(StableDiffusion3Pipeline.from_pretrained(tmp_path / "out"))
    assert not any("lora" in n for n, _ in reloaded.transformer.named_parameters())
    with torch.no_grad():
        v_merged = reloaded.velocity(x, sigma, cond, 4.5, negative=neg)
    assert (v_merged - v_lora).abs().max() < 1e-5  # merged W + BA vs. unmerged x W + (x A) B: fp32 rounding only
    # lora/ keeps alpha: loading it onto the base model reproduces the policy
    lora_cfg = json.loads((tmp_path / "out" / "lora" / "adapter_config.json").read_text())
    assert lora_cfg["lora_alpha"] == 16 and lora_cfg["r"] == 4
    base = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    base.load_lora_weights(tmp_path / "out" / "lora")
    with torch.no_grad():
        torch.testing.assert_close(
            SD3Adapter.from_pipeline(base).velocity(x, sigma, cond, 4.5, negative=neg), v_lora, rtol=1e-5, atol=1e-5
        )


# ------------------------------------------------------------------------------------------------- loading


def test_resolve_model_path_local_tiny_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir.resolve()
    assert resolve_model_path(f"file://{tiny_model_dir}") == tiny_model_dir.resolve()
    with pytest.raises(FileNotFoundError):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        resolve_model_path(f"file://{tmp_path}/missing")
    p = resolve_model_path("tiny", cache_dir=tmp_path)
    assert (p / "model_index.json").is_file() and p.parent == tmp_path
    assert resolve_model_path("tiny:tiny", cache_dir=tmp_path) == p
    a = load_adapter("sd3", "tiny", cache_dir=tmp_path, max_sequence_length=MSL)
    assert isinstance(a, SD3Adapter) and a.family == "sd3"
    with pytest.raises(ValueError, match="sd3"):
        load_adapter("flux9", "tiny", cache_dir=tmp_path)


def test_resolve_hub_id_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def boom(repo_id, **kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    with pytest.raises(loading.ModelResolutionError, match="stabilityai/stable-diffusion-3.5-medium"):
        resolve_model_path("stabilityai/stable-diffusion-3.5-medium")
    seen = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: seen.update(kw) or "/x/snap")
    assert resolve_model_path("org/model", revision="abc") == Path("/x/snap") and seen["revision"] == "abc"


def test_resolve_s3_with_fake_boto3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = {"models/m1/model_index.json": b"{}", "models/m1/vae/config.json": b"{1}", "models/m10/x": b"no"}
    calls: dict[str, list] = {"client": [], "download": []}

    class Client:
        def get_paginator(self, name):
            assert name == "list_objects_v2"
            return types.SimpleNamespace(
                paginate=lambda Bucket, Prefix: [{"Contents": [{"Key": k} for k in objects if k.startswith(Prefix)]}]
            )

        def download_file(self, bucket, key, filename):
            calls["download"].append(key)
            Path(filename).write_bytes(objects[key])

    fake = types.ModuleType("boto3")
    fake.client = lambda service, **kw: calls["client"].append(kw) or Client()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "boto3", fake)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    p = resolve_model_path("s3://bucket/models/m1", cache_dir=tmp_path)
    assert (p / "model_index.json").read_bytes() == b"{}" and (p / "vae" / "config.json").read_bytes() == b"{1}"
    assert sorted(calls["download"]) == ["models/m1/model_index.json", "models/m1/vae/config.json"]
    assert calls["client"] == [{"endpoint_url": "http://127.0.0.1:9000"}]
    assert resolve_model_path("s3://bucket/models/m1/", cache_dir=tmp_path) == p  # cached: no new download
    assert len(calls["download"]) == 2
    with pytest.raises(loading.ModelResolutionError):
        resolve_model_path("s3://bucket/nothing", cache_dir=tmp_path)
