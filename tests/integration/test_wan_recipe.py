"""The one recipe on the offline tiny Wan2.1 (text-to-video: 5-D latents, CFG, LoRA): on-policy invariants through
GRPORecipe.step_loss, one update changes the weights, ``flowgrpo train`` on configs/tiny_wan_cpu.yaml, and the video
plumbing around the recipe (frame-averaged rewards, uint8 clips, a GIF per logged sample)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowgrpo.config import load_config
from flowgrpo.models.tiny_wan import make_tiny_wan_model
from flowgrpo.models.wan import WanAdapter
from flowgrpo.recipe import GRPORecipe
from flowgrpo.rewards import RewardOutput, WeightedReward

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "tiny_wan_cpu.yaml"


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_wan_model(tmp_path_factory.mktemp("models") / "tiny_wan", seed=0)


@pytest.fixture
def wan_cfg(tiny_wan_dir, tmp_path):
    def make(*overrides: str):
        return load_config(PRESET, [f"model.path={tiny_wan_dir}", f"output_dir={tmp_path / 'run'}", "eval.every=0",
                                    "tracking.enabled=false", *overrides])

    return make


def test_on_policy_first_update_ratio_exactly_one(wan_cfg):
    """One sampling batch, one micro-batch, no shuffling/filtering: the sampler's and the trainer's log-probs are the
    same numbers (same 2B CFG forward on the same 5-D latents), so ratio == 1 and clipfrac == 0 exactly; the one
    optimizer step moves every LoRA matrix."""
    cfg = wan_cfg("sample.num_batches_per_epoch=1", "train.gradient_accumulation_steps=1", "train.shuffle=false",
                  "train.filter_zero_std=false", "train.beta=0.04", "train.epochs=1")
    r = GRPORecipe(cfg, resume="never")
    r.setup()
    try:
        assert isinstance(r.adapter, WanAdapter) and r.adapter.lora_config is not None and r.adapter.num_frames == 5
        torch.testing.assert_close(r.sigmas, r.adapter.sigmas(cfg.sample.num_steps))
        rows: list[int] = []
        h = r.adapter.transformer.register_forward_hook(
            lambda m, a, kw, out: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        try:
            samples = r.sample_epoch(0)
        finally:
            h.remove()
        assert set(rows) == {2 * cfg.sample.batch_size}  # CFG 4.5: one call on [negative; positive] per step
        preview = samples.preview[0]
        assert preview.shape == (cfg.sample.batch_size, 5, 32, 32, 3) and preview.dtype == np.uint8
        adv, _ = r.compute_advantages(samples)
        traj = samples.traj
        k_steps = traj.log_probs.shape[1]
        assert k_steps == cfg.sample.num_train_steps == 5 and traj.latents.shape[2:] == (16, 2, 4, 4)
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
        assert not unchanged, unchanged
    finally:
        r.cleanup()


def test_cli_train_one_epoch_exports_wan_pipeline(wan_cfg, tiny_wan_dir, tmp_path):
    from diffusers import WanPipeline

    from flowgrpo.checkpoint import latest_checkpoint
    from flowgrpo.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--config", str(PRESET), "--resume", "never", f"output_dir={out}",
               f"model.path={tiny_wan_dir}", "train.epochs=1", "eval.every=0", "tracking.enabled=false"])
    assert rc == 0
    rec = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 1 and rec[0]["epoch"] == 0 and rec[0]["global_step"] >= 1
    assert all(v is None or v == v for v in rec[0].values())  # no NaN
    # the preview of a video run: a grid of first frames and one looping GIF per sample
    assert (out / "samples" / "train-00000.png").is_file()
    gifs = sorted((out / "samples").glob("train-00000-*.gif"))
    assert len(gifs) == 4
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 5 and gif.size == (32, 32)
    # the exported final model is a plain WanPipeline with the LoRA merged ...
    pipe = WanPipeline.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert (out / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # ... and the checkpoint's trainable state reproduces it
    state = load_file(str(latest_checkpoint(out / "checkpoints") / "trainable.safetensors"))
    cfg = wan_cfg()
    fresh = WanAdapter.from_pretrained(tiny_wan_dir, max_sequence_length=cfg.model.max_sequence_length)
    fresh.add_lora(cfg.model.lora_rank, cfg.model.lora_alpha)
    fresh.load_trainable_state_dict(state)
    exported = WanAdapter.from_pipeline(pipe, max_sequence_length=cfg.model.max_sequence_length)
    x = torch.randn(2, *fresh.latent_shape(32), generator=torch.Generator().manual_seed(0))
    cond = fresh.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        v_ckpt = fresh.velocity(x, torch.tensor([0.8, 0.3]), cond, 1.0)
        v_final = exported.velocity(x, torch.tensor([0.8, 0.3]), cond, 1.0)
        with fresh.reference():
            v_base = fresh.velocity(x, torch.tensor([0.8, 0.3]), cond, 1.0)
    assert (v_ckpt - v_final).abs().max() < 1e-5
    assert (v_ckpt - v_base).abs().max() > 1e-7  # the epoch trained something


class _MeanPixel:
    """Test reward: each image's mean pixel value / 255; records what it was called with."""

    name = "mean_pixel"

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], list[str], list[dict]]] = []

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        self.calls.append((images.shape, list(prompts), list(metadata)))
        return RewardOutput(images.reshape(len(images), -1).mean(axis=1) / 255.0)


def test_video_rewards_are_frame_means_per_clip():
    """Clip i, frame j is the constant image (10 i + j); the reward of a frame is its value / 255, so clip i scores
    mean_j (10 i + j) / 255 = (10 i + 1) / 255 over 3 frames; weights apply to the clip means."""
    from flowgrpo.rollout import to_uint8

    clips = torch.zeros(2, 3, 3, 4, 4)  # [N, F, 3, H, W] float in [0, 1], as the adapter decodes
    for i in range(2):
        for j in range(3):
            clips[i, j] = (10 * i + j) / 255.0
    u8 = to_uint8(clips)
    assert u8.shape == (2, 3, 4, 4, 3) and u8.dtype == np.uint8 and u8[1, 2, 0, 0, 0] == 12
    a, b = _MeanPixel(), _MeanPixel()
    reward = WeightedReward({"a": 2.0, "b": 0.0}, rewards={"a": a, "b": b})
    out = reward(u8, ["p0", "p1"], [{"i": 0}, {"i": 1}])
    expected = np.array([1.0, 11.0]) / 255.0
    np.testing.assert_allclose(out["a"], expected, rtol=1e-12)
    np.testing.assert_allclose(out["avg"], 2.0 * expected, rtol=1e-12)
    assert out["avg"].shape == (2,)
    # the component reward saw frames as images, each with its clip's prompt and metadata
    shape, prompts, meta = a.calls[0]
    assert shape == (6, 4, 4, 3) and prompts == ["p0"] * 3 + ["p1"] * 3 and meta == [{"i": 0}] * 3 + [{"i": 1}] * 3
    # float clips [N, F, 3, H, W] are accepted too (converted per frame)
    np.testing.assert_allclose(reward(clips.numpy(), ["p0", "p1"], [{}, {}])["a"], expected, rtol=1e-12)
    # images keep the image path
    np.testing.assert_allclose(reward(u8[:, 0], ["p0", "p1"], [{}, {}])["a"], np.array([0.0, 10.0]) / 255.0)
    with pytest.raises(ValueError, match="prompts"):
        reward(u8, ["only one"], [{}])


def test_mlflow_logs_a_gif_per_video_sample(tmp_path):
    """The MLflow logger stages the first-frame grid, the captions and one GIF per clip as run artifacts."""
    from mlflow import MlflowClient

    from flowgrpo.tracking import MlflowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("wan", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    lg = MlflowLogger(uri, run_id, timeout_s=10, close_timeout_s=10)
    lg.log_images("eval", np.zeros((2, 5, 8, 8, 3), np.uint8), ["a", "b"], 3)
    assert lg.flush(30)
    names = {f.path for f in client.list_artifacts(run_id, "samples")}
    assert names == {"samples/eval-00003.png", "samples/eval-00003.json", "samples/eval-00003-00.gif",
                     "samples/eval-00003-01.gif"}
    lg.close()
