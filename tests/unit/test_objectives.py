"""DPO / SFT losses and the pair / target selection, worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from flowgrpo.config import ConfigError, load_config
from flowgrpo.objectives import best_of_group, dpo_loss, micro_batches, preference_pairs, sft_loss


def test_dpo_loss_worked_numbers():
    # pair 1: policy raised the winner by 0.01 and lowered the loser by 0.01 -> margin 0.02
    # pair 2: the opposite -> margin -0.02; beta 100 -> logits +2 and -2
    logp_w = torch.tensor([-1.00, -2.00])
    ref_w = torch.tensor([-1.01, -1.99])
    logp_l = torch.tensor([-3.01, -0.99])
    ref_l = torch.tensor([-3.00, -1.00])
    loss, st = dpo_loss(logp_w, logp_l, ref_w, ref_l, beta=100.0)
    expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(2.0)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert st["dpo_margin"].item() == pytest.approx(0.0, abs=1e-6)
    assert st["dpo_accuracy"].item() == 0.5


def test_dpo_loss_at_the_reference_is_log2_and_its_gradient_pushes_apart():
    logp_w = torch.tensor([-1.0], requires_grad=True)
    logp_l = torch.tensor([-1.5], requires_grad=True)
    loss, _ = dpo_loss(logp_w, logp_l, logp_w.detach(), logp_l.detach(), beta=50.0)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    assert logp_w.grad.item() == pytest.approx(-25.0)  # d/dw -log sig(b m) at m=0 = -b/2
    assert logp_l.grad.item() == pytest.approx(25.0)


def test_sft_loss_is_the_mean_negative_log_likelihood():
    logp = torch.tensor([-1.0, -3.0], requires_grad=True)
    loss, st = sft_loss(logp)
    assert loss.item() == 2.0 and st["sft_nll"].item() == 2.0
    loss.backward()
    assert logp.grad.tolist() == [-0.5, -0.5]


def test_preference_pairs_best_vs_worst_per_group_skipping_ties():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.7], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    w, lose = preference_pairs(rewards, groups)
    assert w.tolist() == [1] and lose.tolist() == [0]  # group 1 tied, group 2 has one member


def test_best_of_group_uses_the_global_extrema():
    rewards = torch.tensor([0.2, 0.8, 0.8, 0.5], dtype=torch.float64)
    gmax = torch.tensor([0.9, 0.8, 0.8, 0.5], dtype=torch.float64)  # sample 0's best is on another rank
    gmin = torch.tensor([0.1, 0.1, 0.1, 0.5], dtype=torch.float64)  # group of sample 3: all equal
    assert best_of_group(rewards, gmax, gmin).tolist() == [1, 2]


def test_micro_batches_fill_every_chunk():
    chunks = micro_batches(3, 4)
    assert len(chunks) == 4 and all(len(c) >= 1 for c in chunks)
    assert sorted(torch.cat(chunks).tolist()) == [0, 0, 1, 2]
    assert [c.tolist() for c in micro_batches(8, 2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError):
        micro_batches(0, 2)


@pytest.mark.parametrize("overrides,field", [
    (["train.objective=ppo"], "train.objective"),
    (["train.objective=dpo", "train.dpo_beta=0"], "train.dpo_beta"),
    (["train.objective=sft", "train.guard=true"], "train.guard"),
    (["train.objective=online_dpo", "sample.group_size=1", "sample.batch_size=1", "sample.num_batches_per_epoch=2"],
     "sample.group_size"),
])
def test_objective_config_errors(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.field_name == field
