"""The one recipe on edit models (tiny FLUX.1-Kontext, tiny Qwen-Image-Edit): sources flow from the prompt rows into the conditioning and
the rewards, on-policy invariants with distilled guidance and with true CFG (negative rows with their sources), and
``flowgrpo train`` on upstream's counting_edit rows whose sources ``flowgrpo make-edit-sources`` generated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowgrpo.config import load_config
from flowgrpo.models.flux_kontext import FluxKontextAdapter
from flowgrpo.models.tiny_flux import make_tiny_flux_model
from flowgrpo.recipe import GRPORecipe

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "tiny_flux_kontext_cpu.yaml"
QWEN_PRESET = REPO / "configs" / "tiny_qwen_image_edit_cpu.yaml"
COUNTING_EDIT = REPO.parent / "shared" / "data" / "prompts" / "counting_edit"


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_flux_model(tmp_path_factory.mktemp("models") / "kontext", spec_name="kontext")


@pytest.fixture
def edit_cfg(kontext_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWGRPO_CACHE", str(tmp_path / "cache"))  # shapes_edit sources + tiny models built here

    def make(preset: Path, *overrides: str):
        model = [f"model.path={kontext_dir}"] if preset == PRESET else []  # Qwen: its tiny model, built in the cache
        return load_config(preset, [*model, f"output_dir={tmp_path / 'run'}", "eval.every=0",
                                    "tracking.enabled=false", *overrides])

    return make


@pytest.mark.parametrize("preset,true_cfg", [(PRESET, False), (PRESET, True), (QWEN_PRESET, True)],
                         ids=["kontext-distilled", "kontext-true_cfg", "qwen_image_edit-true_cfg"])
def test_on_policy_edit_update(edit_cfg, preset: Path, true_cfg: bool) -> None:
    cfg = edit_cfg(preset, "sample.num_batches_per_epoch=1", "train.shuffle=false", "train.filter_zero_std=false",
                   "train.beta=0.04", "train.epochs=1", *(["sample.guidance_scale=4.0"] if true_cfg else []))
    r = GRPORecipe(cfg, resume="never")
    r.setup()
    try:
        assert r.edit and r.adapter.edit and r.negative is None
        if isinstance(r.adapter, FluxKontextAdapter):
            r.adapter.true_cfg = true_cfg
        rows: list[int] = []
        h = r.adapter.transformer.register_forward_hook(
            lambda m, a, kw, out: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
        try:
            samples = r.sample_epoch(0)
        finally:
            h.remove()
        b = cfg.sample.batch_size
        assert set(rows) == {2 * b if true_cfg else b}  # true CFG: one call on [negative; positive]
        traj = samples.traj
        # every row's conditioning carries the latents of its own source image
        expected = r.adapter.encode_prompts(traj.prompts, images=r.encoder.sources(traj.metadata))
        torch.testing.assert_close(traj.cond["image_latents"], expected["image_latents"])
        n_pairs = len({(p, m["image"]) for p, m in zip(traj.prompts, traj.metadata)})
        n_sources = len({m["image"] for m in traj.metadata})
        assert r.encoder.calls == n_pairs + (n_sources if true_cfg else 0)  # once per pair (+ "" per source)
        adv, _ = r.compute_advantages(samples)
        for k in range(traj.log_probs.shape[1]):
            _, stats = r.step_loss(traj, adv, k)
            assert stats["ratio_mean"].item() == 1.0 and stats["clipfrac"].item() == 0.0
            assert stats["kl"].item() == 0.0
        named = [(n, p) for n, p in r.adapter.transformer.named_parameters() if p.requires_grad]
        before = {n: p.detach().clone() for n, p in named}
        record = r.train_epoch(0, traj, adv)
        assert record["ratio_mean"] == 1.0 and record["clipfrac"] == 0.0
        assert [n for n, p in named if torch.equal(before[n], p)] == []
    finally:
        r.cleanup()


@pytest.mark.skipif(not COUNTING_EDIT.is_dir(), reason=f"shared prompt data not found at {COUNTING_EDIT}")
def test_counting_edit_with_generated_sources_trains_and_exports_kontext(kontext_dir, tmp_path, monkeypatch):
    from diffusers import FluxKontextPipeline

    from flowgrpo.checkpoint import latest_checkpoint
    from flowgrpo.cli import main

    monkeypatch.setenv("FLOWGRPO_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "counting_edit"
    data.mkdir()
    for split in ("train", "test"):
        lines = (COUNTING_EDIT / f"{split}_metadata.jsonl").read_text().splitlines()[:8]
        (data / f"{split}_metadata.jsonl").write_text("\n".join(lines) + "\n")
    overrides = [f"model.path={kontext_dir}", f"data.train_prompts={data / 'train_metadata.jsonl'}",
                 f"data.test_prompts={data / 'test_metadata.jsonl'}", "tracking.enabled=false"]
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="make-edit-sources"):  # upstream ships no images: fails up front
        main(["train", "--config", str(PRESET), f"output_dir={out}", *overrides])
    assert not (out / "metrics.jsonl").exists()
    for split in ("train", "test"):  # sources from the rows' t2i_prompt with the tiny SD3
        assert main(["make-edit-sources", str(data / f"{split}_metadata.jsonl"), str(data), "--model", "tiny",
                     "--resolution", "64", "--steps", "3", "--device", "cpu"]) == 0
    rows = [json.loads(ln) for ln in (data / "train_metadata.jsonl").read_text().splitlines()]
    assert all((data / r["image"]).is_file() for r in rows)
    rc = main(["train", "--config", str(PRESET), "--resume", "never", f"output_dir={out}", *overrides,
               "train.epochs=1", "train.checkpoint_every=1", "eval.every=1", "eval.num_prompts=4",
               "reward.shapes=null", "reward.jpeg_compressibility=1.0"])
    assert rc == 0
    rec = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec[0]["epoch"] == 0 and -1.0 <= rec[0]["reward_image_similarity_mean"] <= 1.0
    assert "eval_reward_image_similarity" in rec[-1]
    assert latest_checkpoint(out / "checkpoints") is not None
    assert isinstance(FluxKontextPipeline.from_pretrained(out / "final"), FluxKontextPipeline)


def test_cli_train_one_epoch_exports_qwen_image_edit(tmp_path, monkeypatch):
    """`flowgrpo train` on the tiny Qwen-Image-Edit preset (shapes edits, true CFG): one epoch, a checkpoint, an
    exported QwenImageEditPipeline that reloads with the source size it was trained with."""
    from flowgrpo.checkpoint import latest_checkpoint
    from flowgrpo.cli import main
    from flowgrpo.models.qwen_image import QwenImageEditAdapter

    monkeypatch.setenv("FLOWGRPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--config", str(QWEN_PRESET), "--resume", "never", f"output_dir={out}", "train.epochs=1",
                 "train.checkpoint_every=1", "eval.every=0", "tracking.enabled=false"]) == 0
    rec = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 1 and 0.0 <= rec[0]["reward_shapes_mean"] <= 1.0
    assert latest_checkpoint(out / "checkpoints") is not None
    exported = QwenImageEditAdapter.from_pretrained(out / "final", max_sequence_length=128)
    assert exported.source_resolution == 64 and type(exported.pipe).__name__ == "QwenImageEditPipeline"
