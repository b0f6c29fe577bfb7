"""The one recipe on the offline tiny Qwen-Image (LoRA, true CFG with norm rescaling, dynamic shift): on-policy
invariants through GRPORecipe.step_loss, one update changes the weights, and ``flowgrpo train`` on
configs/tiny_qwen_image_cpu.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.config import load_config
from flowgrpo.models.qwen_image import QwenImageAdapter
from flowgrpo.models.tiny_qwen_image import make_tiny_qwen_image_model
from flowgrpo.recipe import GRPORecipe

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "tiny_qwen_image_cpu.yaml"


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen_image_model(tmp_path_factory.mktemp("models") / "tiny_qwen", seed=0)


@pytest.fixture
def qwen_cfg(tiny_qwen_dir, tmp_path):
    def make(*overrides: str):
        return load_config(PRESET, [f"model.path={tiny_qwen_dir}", f"output_dir={tmp_path / 'run'}", "eval.every=0",
                                    "tracking.enabled=false", *overrides])

    return make


def test_on_policy_first_update_ratio_exactly_one(qwen_cfg):
    """One sampling batch, one micro-batch, no shuffling/filtering: the sampler's and the trainer's log-probs are
    the same numbers (same 2B CFG forward on the same trimmed text), so ratio == 1 and clipfrac == 0 exactly."""
    cfg = qwen_cfg("sample.num_batches_per_epoch=1", "train.gradient_accumulation_steps=1", "train.shuffle=false",
                   "train.filter_zero_std=false", "train.beta=0.04", "train.epochs=1")
    r = GRPORecipe(cfg, resume="never")
    r.setup()
    try:
        assert isinstance(r.adapter, QwenImageAdapter) and r.adapter.lora_config is not None
        assert r.adapter.resolution == cfg.sample.resolution == 64
        torch.testing.assert_close(r.sigmas, r.adapter.sigmas(cfg.sample.num_steps))  # Qwen's shifted schedule
        rows: list[int] = []
        h = r.adapter.transformer.register_forward_hook(
            lambda m, a, kw, out: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        try:
            samples = r.sample_epoch(0)
        finally:
            h.remove()
        assert set(rows) == {2 * cfg.sample.batch_size}  # true CFG 4.0: one call on the 2B batch per step
        adv, _ = r.compute_advantages(samples)
        traj = samples.traj
        k_steps = traj.log_probs.shape[1]
        assert k_steps == cfg.sample.num_train_steps == 5 and traj.latents.shape[2:] == (16, 8, 8)
        assert traj.cond["prompt_embeds"].shape[1] == cfg.model.max_sequence_length
        for k in range(k_steps):
            _, stats = r.step_loss(traj, adv, k)
            assert stats["ratio_mean"].item() == 1.0, k
            assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
            assert stats["kl"].item() == 0.0  # LoRA B = 0 at init: policy == reference
        named = [(n, p) for n, p in r.adapter.transformer.named_parameters() if p.requires_grad]
        before = {n: p.detach().clone() for n, p in named}
        record = r.train_epoch(0, traj, adv)
        assert record["ratio_mean"] == 1.0 and record["clipfrac"] == 0.0  # the single update is on-policy
        assert r.global_step == 1
        unchanged = [n for n, p in named if torch.equal(before[n], p)]
        assert not unchanged, unchanged  # every trainable LoRA matrix moved
    finally:
        r.cleanup()


def test_cli_train_one_epoch_exports_qwen_image_pipeline(tiny_qwen_dir, tmp_path):
    from diffusers import QwenImagePipeline

    from flowgrpo.checkpoint import latest_checkpoint
    from flowgrpo.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--config", str(PRESET), "--resume", "never", f"output_dir={out}",
               f"model.path={tiny_qwen_dir}", "train.epochs=1", "train.checkpoint_every=1", "eval.every=0",
               "sample.num_batches_per_epoch=1", "tracking.enabled=false"])
    assert rc == 0
    rec = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 1 and rec[0]["epoch"] == 0 and rec[0]["global_step"] >= 1
    assert all(v is None or v == v for v in rec[0].values())  # no NaN
    pipe = QwenImagePipeline.from_pretrained(out / "final")  # a plain QwenImagePipeline, LoRA merged
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert (out / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # the checkpoint's trainable state loads into a fresh adapter and reproduces the merged export's velocity
    state = load_file(str(latest_checkpoint(out / "checkpoints") / "trainable.safetensors"))
    cfg = load_config(PRESET, [f"model.path={tiny_qwen_dir}"])
    msl = cfg.model.max_sequence_length
    fresh = QwenImageAdapter.from_pretrained(tiny_qwen_dir, max_sequence_length=msl)
    fresh.add_lora(cfg.model.lora_rank, cfg.model.lora_alpha)
    fresh.load_trainable_state_dict(state)
    exported = QwenImageAdapter.from_pipeline(pipe, max_sequence_length=msl, resolution=64)
    x = torch.randn(2, *fresh.latent_shape(64), generator=torch.Generator().manual_seed(0))
    cond, neg = fresh.encode_prompts(["a cat", "a dog"]), fresh.encode_prompts([""])
    s = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        v_ckpt = fresh.velocity(x, s, cond, 4.0, neg)
        v_final = exported.velocity(x, s, cond, 4.0, neg)
        with fresh.reference():
            v_base = fresh.velocity(x, s, cond, 4.0, neg)
    assert (v_ckpt - v_final).abs().max() < 1e-4
    assert (v_ckpt - v_base).abs().max() > 1e-6  # the epoch trained something
