"""Closed-form cases of the Flow-GRPO clipped objective (flowgrpo.loss).

L = mean_B max(-A r, -A clip(r, 1 - eps, 1 + eps)) + beta * mean(kl);   eps = clip_range = 0.2 below.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowgrpo import loss as L
from flowgrpo import sde

EPS = 0.2


def _loss(log_ratio, adv, **kw):
    log_ratio = torch.as_tensor(log_ratio, dtype=torch.float32).reshape(-1)
    adv = torch.as_tensor(adv, dtype=torch.float32).reshape(-1)
    old = torch.zeros_like(log_ratio)
    kw.setdefault("adv_clip_max", 5.0)
    return L.grpo_loss(old + log_ratio, old, adv, clip_range=EPS, **kw)


def test_unclipped_positive_advantage():
    # A = +1, r = 1.1 in [0.8, 1.2]: max(-1.1, -1.1) = -1.1
    loss, stats = _loss([math.log(1.1)], [1.0])
    assert loss.item() == pytest.approx(-1.1, abs=1e-6)
    assert stats["clipfrac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.1, abs=1e-6)


def test_clipped_high_positive_advantage():
    # A = +1, r = e ~ 2.718 > 1.2: max(-e, -1.2) = -1.2 (no gain beyond the trust region)
    loss, stats = _loss([1.0], [1.0])
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)
    assert stats["clipfrac"].item() == 1.0
    assert stats["clipfrac_gt_one"].item() == 1.0
    assert stats["clipfrac_lt_one"].item() == 0.0


def test_clipped_low_negative_advantage():
    # A = -1, r = 0.5 < 0.8: max(0.5, 0.8) = 0.8
    loss, stats = _loss([math.log(0.5)], [-1.0])
    assert loss.item() == pytest.approx(0.8, abs=1e-6)
    assert stats["clipfrac_lt_one"].item() == 1.0
    assert stats["clipfrac_gt_one"].item() == 0.0


def test_negative_advantage_ratio_above_is_pessimistic():
    # A = -1, r = 1.5 > 1.2: max(1.5, 1.2) = 1.5 (the unclipped side wins: the penalty is not capped)
    loss, stats = _loss([math.log(1.5)], [-1.0])
    assert loss.item() == pytest.approx(1.5, abs=1e-6)
    assert stats["clipfrac"].item() == 1.0  # counted as outside the range even though unclipped won


def test_positive_advantage_ratio_below():
    # A = +1, r = 0.5 < 0.8: max(-0.5, -0.8) = -0.5
    loss, _ = _loss([math.log(0.5)], [1.0])
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)


def test_batch_mean_of_cases():
    # the five cases above in one batch: (-1.1 - 1.2 + 0.8 + 1.5 - 0.5) / 5 = -0.1
    lr = [math.log(1.1), 1.0, math.log(0.5), math.log(1.5), math.log(0.5)]
    adv = [1.0, 1.0, -1.0, -1.0, 1.0]
    loss, stats = _loss(lr, adv)
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(4 / 5)
    assert stats["clipfrac_gt_one"].item() == pytest.approx(2 / 5)  # e and 1.5
    assert stats["clipfrac_lt_one"].item() == pytest.approx(2 / 5)  # 0.5 twice
    # approx_kl = 0.5 mean(log_ratio^2)
    expected_kl = 0.5 * sum(x * x for x in lr) / 5
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)


def test_on_policy():
    # log_prob == old: r = exp(0) = 1 exactly, nothing clipped, loss = -mean(clamp(A))
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(8, generator=g)
    adv = torch.randn(8, generator=g) * 3
    loss, stats = L.grpo_loss(logp, logp.clone(), adv, clip_range=EPS, adv_clip_max=2.0)
    assert torch.all(stats["ratio_mean"] == 1.0)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    torch.testing.assert_close(loss, -adv.clamp(-2.0, 2.0).mean())


def test_advantage_clipping():
    # A = [5, 1, -4] clamped at 2 -> [2, 1, -2], on-policy: loss = -(2 + 1 - 2) / 3 = -1/3
    loss, _ = _loss([0.0, 0.0, 0.0], [5.0, 1.0, -4.0], adv_clip_max=2.0)
    assert loss.item() == pytest.approx(-1 / 3, abs=1e-6)


def test_beta_kl_added_and_reported():
    kl = torch.tensor([0.2, 0.4])  # mean 0.3
    # beta 0.5: policy -1 (A = 1, r = 1) + 0.5 * 0.3 = -0.85
    loss, stats = _loss([0.0, 0.0], [1.0, 1.0], beta=0.5, kl=kl)
    assert loss.item() == pytest.approx(-0.85, abs=1e-6)
    assert stats["policy_loss"].item() == pytest.approx(-1.0, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.3, abs=1e-6)
    assert stats["loss"].item() == pytest.approx(-0.85, abs=1e-6)
    # beta 0: kl still reported, not added
    loss0, stats0 = _loss([0.0, 0.0], [1.0, 1.0], beta=0.0, kl=kl)
    assert loss0.item() == pytest.approx(-1.0, abs=1e-6)
    assert stats0["kl"].item() == pytest.approx(0.3, abs=1e-6)
    # no kl: reported as 0
    _, stats_none = _loss([0.0], [1.0])
    assert stats_none["kl"].item() == 0.0


def test_gradient_of_loss():
    # unclipped, A = 1: L = -mean(r) => dL/dlogp = -r / B; clipped sample: zero gradient
    logp = torch.tensor([math.log(1.1), 1.0], requires_grad=True)
    old = torch.zeros(2)
    loss, _ = L.grpo_loss(logp, old, torch.ones(2), clip_range=EPS, adv_clip_max=5.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1.1 / 2, 0.0]))


def test_stats_are_detached():
    logp = torch.zeros(3, requires_grad=True)
    _, stats = L.grpo_loss(logp, torch.zeros(3), torch.ones(3), clip_range=EPS, adv_clip_max=5.0)
    assert all(not v.requires_grad for v in stats.values())


# ---------------------------------------------------------------------------------------------------
# GRPO-Guard
# ---------------------------------------------------------------------------------------------------


def test_ratio_norm_same_mean_is_scaled_log_ratio():
    # mean == old_mean: bias 0, log r_norm = (logp - old) * std
    g = torch.Generator().manual_seed(1)
    logp, old = torch.randn(4, generator=g), torch.randn(4, generator=g)
    mean = torch.randn(4, 2, 3, 3, generator=g)
    std = torch.tensor([0.1, 0.3, 0.5, 0.9])
    out = L.ratio_norm_log_ratio(logp, old, mean, mean.clone(), std)
    torch.testing.assert_close(out, (logp - old) * std)


def test_ratio_norm_is_zero_mean_projection():
    # x' = mu_old + s z:  log r = mean_d[z d]/s - mean_d[d^2]/(2 s^2),  d = mu - mu_old
    # => (log r + mean_d[d^2]/(2 s^2)) * s = mean_d[z d]
    g = torch.Generator().manual_seed(2)
    b = 4
    std = torch.tensor([0.05, 0.2, 0.5, 0.8])
    sv = std.view(-1, 1, 1, 1)
    old_mean = torch.randn(b, 2, 4, 4, generator=g)
    d = 0.3 * sv * torch.randn(b, 2, 4, 4, generator=g)
    mean = old_mean + d
    z = torch.randn(b, 2, 4, 4, generator=g)
    x_next = old_mean + sv * z
    logp = sde.gaussian_log_prob(x_next, mean, std)
    old = sde.gaussian_log_prob(x_next, old_mean, std)
    out = L.ratio_norm_log_ratio(logp, old, mean, old_mean, std)
    expected = (z * d).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_guard_weights_scale_policy_loss():
    # on-policy (mean == old_mean, logp == old): r = 1, per-sample -A = -1, weighted by 1/|dt|:
    # mean(-1/0.1, -1/0.2) = mean(-10, -5) = -7.5 (unguarded: -1)
    b = 2
    logp = torch.tensor([-1.0, -2.0])
    mean = torch.zeros(b, 2, 2)
    std = torch.tensor([0.3, 0.4])
    dt = torch.tensor([-0.1, -0.2])
    adv = torch.ones(b)
    loss, stats = L.grpo_loss(
        logp, logp.clone(), adv, clip_range=EPS, adv_clip_max=5.0,
        guard=True, mean=mean, old_mean=mean.clone(), std=std, dt=dt,
    )
    assert loss.item() == pytest.approx(-7.5, abs=1e-5)
    assert stats["ratio_mean"].item() == 1.0
    plain, _ = L.grpo_loss(logp, logp.clone(), adv, clip_range=EPS, adv_clip_max=5.0)
    assert plain.item() == pytest.approx(-1.0, abs=1e-6)


def test_guard_uses_normalised_ratio():
    # guard=True with same means: log r_norm = log_ratio * std; log_ratio 1, std 0.1 -> r = e^0.1 ~ 1.105
    # clip 0.2: unclipped, A = 1, dt = -1 -> loss = -e^0.1
    logp = torch.tensor([1.0])
    old = torch.tensor([0.0])
    mean = torch.zeros(1, 3)
    loss, _ = L.grpo_loss(
        logp, old, torch.ones(1), clip_range=EPS, adv_clip_max=5.0,
        guard=True, mean=mean, old_mean=mean, std=torch.tensor([0.1]), dt=torch.tensor([-1.0]),
    )
    assert loss.item() == pytest.approx(-math.exp(0.1), abs=1e-6)


@pytest.mark.parametrize("missing", ["mean", "old_mean", "std", "dt"])
def test_guard_requires_inputs(missing):
    kw = dict(mean=torch.zeros(1, 2), old_mean=torch.zeros(1, 2), std=torch.ones(1), dt=-torch.ones(1))
    kw[missing] = None
    with pytest.raises(ValueError, match="Guard"):
        L.grpo_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), EPS, 5.0, guard=True, **kw)
