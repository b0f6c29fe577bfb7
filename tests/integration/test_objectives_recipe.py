"""Every objective runs one epoch on the tiny SD3 through the one recipe; offline ones sample from the reference."""

from __future__ import annotations

import pytest
import torch

from flowgrpo.recipe import GRPORecipe


def _weights(recipe: GRPORecipe) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in recipe.params])


@pytest.mark.parametrize("objective", ["dpo", "online_dpo", "sft", "online_sft"])
def test_one_epoch_per_objective(tiny_cfg, tmp_path, objective):
    cfg = tiny_cfg(f"train.objective={objective}", "train.epochs=1", "train.checkpoint_every=0",
                   out=tmp_path / objective)
    recipe = GRPORecipe(cfg)
    recipe.setup()
    try:
        before = _weights(recipe)
        samples = recipe.sample_epoch(0)
        adv, _ = recipe.compute_advantages(samples)
        if "dpo" in objective:  # before any update the policy is the reference: the DPO loss is exactly log 2
            from flowgrpo.objectives import preference_pairs

            w, lose = preference_pairs(torch.as_tensor(samples.rewards["avg"]), samples.traj.group_ids)
            mb = samples.traj.select(torch.cat([w, lose]))
            loss0, st0 = recipe.preference_step_loss(mb, 1.0, 0)
            assert loss0.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
            assert st0["dpo_margin"].item() == 0.0
        stats = recipe.train_epoch(0, samples.traj, adv, samples.rewards["avg"])
        after = _weights(recipe)
        assert torch.isfinite(torch.tensor(stats["loss"]))
        assert not torch.equal(before, after), "one epoch must change the weights"
        if "dpo" in objective:
            assert stats["pairs"] == 4  # 32 images in 4 groups of 8: one best-vs-worst pair per group
            assert 0.0 <= stats["dpo_accuracy"] <= 1.0
        else:
            assert stats["sft_targets"] >= 4  # at least the best image of each of the 4 groups

        # the next epoch's samples: offline objectives keep sampling the reference (base) policy
        nxt = recipe.sample_epoch(1)
        fresh = GRPORecipe(tiny_cfg(f"train.objective={objective}", out=tmp_path / f"{objective}-fresh"))
        fresh.setup()
        try:
            base = fresh.sample_epoch(1)
        finally:
            fresh.cleanup()
        same = torch.equal(nxt.traj.latents, base.traj.latents)
        assert same == (objective in ("dpo", "sft"))
    finally:
        recipe.cleanup()


@pytest.mark.slow
def test_objective_runs_through_the_cli(tmp_path, tiny_model_dir):
    from flowgrpo.cli import main

    rc = main(["train", "--config", "configs/tiny_cpu.yaml", f"model.path={tiny_model_dir}",
               f"output_dir={tmp_path / 'run'}", "train.objective=online_dpo", "train.epochs=1", "eval.every=0",
               "tracking.enabled=false"])
    assert rc == 0 and (tmp_path / "run" / "final" / "model_index.json").is_file()
