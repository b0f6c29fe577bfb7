"""Group-normalised advantages and the zero-advantage filter (flowgrpo.advantages)."""

from __future__ import annotations

import math

import pytest
import torch

from flowgrpo.advantages import group_advantages, keep_nonzero

REWARDS = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_per_group_std():
    # group 0: mean 2, population std sqrt((1 + 0 + 1) / 3) = sqrt(2/3) = 0.8165
    #   -> A = [-1, 0, 1] / (0.8165 + 1e-4)
    # group 1: all 10 -> deviations 0 -> A = 0 (0 / (0 + 1e-4))
    adv, stats = group_advantages(REWARDS, GROUPS, global_std=False)
    s0 = math.sqrt(2 / 3)
    expected = torch.tensor([-1 / (s0 + 1e-4), 0.0, 1 / (s0 + 1e-4), 0.0, 0.0, 0.0])
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=1e-6)
    assert stats.num_groups == 2
    assert stats.group_size_mean == 3.0
    assert stats.zero_std_ratio == 0.5
    assert stats.reward_std_mean == pytest.approx(s0 / 2)


def test_global_std():
    # all six: mean 6, deviations -5 -4 -3 4 4 4 -> squares 25+16+9+48 = 98 -> std sqrt(98/6) = 4.0415
    # means stay per group: A = [-1, 0, 1, 0, 0, 0] / (4.0415 + 1e-4)
    adv, stats = group_advantages(REWARDS, GROUPS, global_std=True)
    s = math.sqrt(98 / 6)
    expected = torch.tensor([-1 / (s + 1e-4), 0.0, 1 / (s + 1e-4), 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=1e-6)
    assert stats.zero_std_ratio == 0.5  # stats are per group regardless


def test_default_is_global_std():
    a, _ = group_advantages(REWARDS, GROUPS)
    b, _ = group_advantages(REWARDS, GROUPS, global_std=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("global_std", [False, True])
def test_interleaved_group_ids(global_std):
    # same data, groups interleaved and with arbitrary ids (7 ~ group 0, 3 ~ group 1)
    perm = torch.tensor([0, 3, 1, 4, 2, 5])
    ids = torch.tensor([7, 3, 7, 3, 7, 3])
    adv, stats = group_advantages(REWARDS[perm], ids, global_std=global_std)
    ref, _ = group_advantages(REWARDS, GROUPS, global_std=global_std)
    torch.testing.assert_close(adv, ref[perm])
    assert stats.num_groups == 2 and stats.zero_std_ratio == 0.5


def test_groups_of_unequal_size_and_custom_eps():
    # group 5: [0, 4] mean 2 std 2 -> [-1, 1] * 2/(2+eps); group 9: [3] alone -> 0
    r = torch.tensor([0.0, 3.0, 4.0])
    ids = torch.tensor([5, 9, 5])
    adv, stats = group_advantages(r, ids, global_std=False, eps=0.5)
    torch.testing.assert_close(adv, torch.tensor([-2 / 2.5, 0.0, 2 / 2.5]))
    assert stats.group_size_mean == 1.5
    assert stats.zero_std_ratio == 0.5


@pytest.mark.parametrize("global_std", [False, True])
def test_constant_group_gives_exact_zero_in_fp64(global_std):
    # fp64 rewards (e.g. from numpy): 7 * 0.7 / 7 != 0.7 in double, so (r - mean) was ~1e-16 and the
    # advantage ~1e-12 instead of 0, and keep_nonzero kept the group. Constant groups must give exactly 0.
    r = torch.tensor([0.7] * 7 + [0.0, 1.0] * 3 + [0.9], dtype=torch.float64)
    ids = torch.tensor([0] * 7 + [1] * 7)
    adv, stats = group_advantages(r, ids, global_std=global_std)
    assert torch.all(adv[:7] == 0)
    assert torch.all(adv[7:] != 0)
    assert stats.zero_std_ratio == 0.5
    assert keep_nonzero(adv, 7, torch.Generator().manual_seed(0)).tolist() == list(range(7, 14))


def test_per_group_zero_mean():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(24, generator=g)
    ids = torch.arange(24) % 4
    adv, _ = group_advantages(r, ids, global_std=False)
    for k in range(4):
        a = adv[ids == k].double()
        assert a.mean().abs() < 1e-6
        assert a.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)  # std/(std+1e-4)


# ---------------------------------------------------------------------------------------------------
# keep_nonzero
# ---------------------------------------------------------------------------------------------------


def test_keep_nonzero_pads_to_multiple():
    adv = torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 1.0, 0.0, 0.0])
    # 3 non-zero, num_batches 2 -> target 4: one dropped sample re-added
    idx = keep_nonzero(adv, 2, torch.Generator().manual_seed(0))
    assert idx.dtype == torch.long
    assert idx.numel() == 4
    assert torch.equal(idx, idx.sort().values)
    assert {0, 2, 5} <= set(idx.tolist())
    extra = set(idx.tolist()) - {0, 2, 5}
    assert len(extra) == 1 and extra <= {1, 3, 4, 6, 7}


def test_keep_nonzero_deterministic():
    adv = torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    a = keep_nonzero(adv, 4, torch.Generator().manual_seed(123))
    b = keep_nonzero(adv, 4, torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    assert a.numel() == 4
    # different seeds pick different padding at least sometimes
    picks = {tuple(keep_nonzero(adv, 4, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(picks) > 1


def test_keep_nonzero_no_padding_needed():
    adv = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.0, 3.0])
    idx = keep_nonzero(adv, 2, torch.Generator().manual_seed(0))  # 4 non-zero, multiple of 2
    assert idx.tolist() == [0, 2, 3, 5]


def test_keep_nonzero_all_zero_keeps_one_per_batch():
    adv = torch.zeros(8)
    idx = keep_nonzero(adv, 4, torch.Generator().manual_seed(0))  # positive multiple: 4, not 0
    assert idx.numel() == 4
    assert len(set(idx.tolist())) == 4


def test_keep_nonzero_all_nonzero():
    adv = torch.arange(1, 7).float()
    assert keep_nonzero(adv, 3, torch.Generator().manual_seed(0)).tolist() == list(range(6))


def test_keep_nonzero_impossible_split_raises():
    # 3 samples, none zero, 2 micro-batches: cannot pad
    with pytest.raises(ValueError):
        keep_nonzero(torch.ones(3), 2, torch.Generator().manual_seed(0))
