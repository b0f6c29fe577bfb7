"""Checkpoints on S3 (moto's server on 127.0.0.1): published with manifest and marker, resumed from S3 into a
fresh output dir with bit-identical results, and interrupted or corrupt checkpoints never resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from flowgrpo import checkpoint as ckpt
from flowgrpo import storage
from flowgrpo.recipe import GRPORecipe, run_training

FAST = ["sample.num_batches_per_epoch=2", "train.gradient_accumulation_steps=1", "train.checkpoint_every=1"]


@pytest.fixture
def bucket(s3_bucket) -> str:
    return s3_bucket


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _s3_trainable(uri: str) -> dict[str, torch.Tensor]:
    return load_safetensors(storage.read_bytes(storage.join(uri, "trainable.safetensors")))


def test_checkpoints_in_s3_resume_bit_identical(bucket, tiny_cfg, tmp_path):
    root = f"s3://{bucket}/runs/x/checkpoints"
    final = f"s3://{bucket}/runs/x/final"
    straight = tmp_path / "straight"  # uninterrupted, local checkpoints
    run_training(tiny_cfg("train.epochs=2", *FAST, out=straight), resume="never")

    first = tmp_path / "first"
    run_training(tiny_cfg("train.epochs=1", *FAST, f"storage.checkpoint_uri={root}", out=first), resume="never")
    assert not (first / "checkpoints").exists() and not (first / ".checkpoint-staging").exists()
    [step_dir] = storage.list_dirs(root)
    files = storage.list_files(storage.join(root, step_dir))
    assert {"trainable.safetensors", "optimizer.pt", "state.json", "rng-rank0.pt", "config.yaml", "MANIFEST.json",
            "_COMPLETE"} <= set(files)
    manifest = storage.verify(storage.join(root, step_dir))  # marker, manifest and every sha256
    assert set(manifest["files"]) == set(files) - {"MANIFEST.json", "_COMPLETE"}

    # a fresh output dir (another pod): everything it resumes from comes from S3
    second = tmp_path / "second"
    run_training(tiny_cfg("train.epochs=2", *FAST, f"storage.checkpoint_uri={root}", "train.keep_checkpoints=1",
                          f"storage.final_uri={final}", out=second), resume="auto")
    assert [r["epoch"] for r in _records(second)] == [1]  # continued at epoch 1
    assert (second / ".checkpoint-cache" / step_dir / "_COMPLETE").is_file()
    latest = ckpt.latest_checkpoint(root)
    assert storage.list_dirs(root) == [latest.rsplit("/", 1)[-1]] != [step_dir]  # pruned to keep_checkpoints=1
    a = load_file(str(ckpt.latest_checkpoint(straight / "checkpoints") / "trainable.safetensors"))
    b = _s3_trainable(latest)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(straight)[1]["reward_mean"] == _records(second)[0]["reward_mean"]
    assert "model_index.json" in storage.verify(final)["files"]  # the final model, published with a manifest


def _publish_copy(good: Path, root: str, step: int, *, marker: bool = True) -> str:
    uri = storage.join(root, f"step-{step}")
    if marker:
        storage.publish_dir(good, uri)
    else:  # an upload killed after its data and manifest, before the marker
        write = storage.write_bytes

        def dying(target, data):
            if str(target).endswith("/_COMPLETE"):
                raise KeyboardInterrupt("killed")
            write(target, data)

        storage.write_bytes = dying
        try:
            with pytest.raises(KeyboardInterrupt):
                storage.publish_dir(good, uri)
        finally:
            storage.write_bytes = write
    return uri


def test_interrupted_and_corrupt_s3_checkpoints_are_skipped(bucket, tiny_cfg, tmp_path):
    root = f"s3://{bucket}/runs/y/checkpoints"
    run_training(tiny_cfg("train.epochs=1", *FAST, f"storage.checkpoint_uri={root}", out=tmp_path / "a"),
                 resume="never")
    good_uri = ckpt.latest_checkpoint(root)
    good = tmp_path / "good"
    storage.download_published(good_uri, good)
    n = json.loads((good / "state.json").read_text())["global_step"]

    half = storage.join(root, f"step-{n + 10}")  # half the files uploaded, then the process died
    for rel in sorted(storage.verify(good_uri, deep=False)["files"])[:2]:
        storage.upload_file(good / rel, storage.join(half, rel))
    _publish_copy(good, root, n + 20, marker=False)
    tampered = _publish_copy(good, root, n + 30)  # complete, then an object was overwritten (same size)
    size = len(storage.read_bytes(storage.join(tampered, "optimizer.pt")))
    storage.write_bytes(storage.join(tampered, "optimizer.pt"), bytes(size))
    bad_manifest = _publish_copy(good, root, n + 40)  # complete, then its manifest was corrupted
    text = storage.read_text(storage.join(bad_manifest, "MANIFEST.json"))
    storage.write_text(storage.join(bad_manifest, "MANIFEST.json"), text.replace('"size": ', '"size": 1'))
    assert len(storage.list_dirs(root)) == 5

    r = GRPORecipe(tiny_cfg("train.epochs=2", *FAST, f"storage.checkpoint_uri={root}", out=tmp_path / "b"),
                   resume="auto")
    with pytest.warns(UserWarning) as caught:
        r.setup()
    try:
        msgs = [str(w.message) for w in caught]
        for step, kind in [(n + 40, "corrupt"), (n + 30, "corrupt"), (n + 20, "incomplete"), (n + 10, "incomplete")]:
            assert any(f"skipping {kind} checkpoint" in m and f"step-{step}" in m for m in msgs), (step, msgs)
        assert any("sha256 mismatch for optimizer.pt" in m for m in msgs)
        assert r.start_epoch == 1 and r.global_step == n  # resumed from the only good one
        have = r.adapter.trainable_state_dict()
        want = load_file(str(good / "trainable.safetensors"))
        assert all(torch.equal(have[k].cpu(), want[k]) for k in want)
    finally:
        r.cleanup()
    # the interrupted ones never become resumable, and pruning after a newer good save removes them
    assert not storage.is_complete(half) and not storage.is_complete(storage.join(root, f"step-{n + 20}"))
    staging = tmp_path / "staging"
    storage.download_published(good_uri, staging)
    for f in (staging / "MANIFEST.json", staging / "_COMPLETE"):
        f.unlink()
    ckpt.publish(staging, root, n + 50, json.loads((good / "state.json").read_text()), keep=1)
    assert storage.list_dirs(root) == [f"step-{n + 50}"]
