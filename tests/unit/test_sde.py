"""Closed-form tests of the stochastic sampler steps (flowgrpo.sde)."""

from __future__ import annotations

import math

import pytest
import torch

from flowgrpo import schedule, sde

SIGMAS = schedule.shifted_sigmas(10, 3.0)  # SD3.5-M reference schedule, [11]


def _batch_of_steps(steps=(0, 1, 4, 8)):
    """Per-sample (sigma, sigma_next) for a batch holding different steps of the 10-step schedule."""
    idx = torch.tensor(steps)
    return SIGMAS[idx], SIGMAS[idx + 1]


def _xv(b, *dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *dims, generator=g)
    v = torch.randn(b, *dims, generator=g)
    return x, v, g


# ---------------------------------------------------------------------------------------------------
# noise_level 0 == Euler ODE step
# ---------------------------------------------------------------------------------------------------


def test_ode_step_is_euler():
    x, v, _ = _xv(3, 2, 4, 4)
    s, s_next = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.9, 0.3, 0.0])
    expected = x + (s_next - s).view(-1, 1, 1, 1) * v
    torch.testing.assert_close(sde.ode_step(x, v, s, s_next), expected, atol=1e-6, rtol=0)


def test_sde_noise_level_zero_is_ode():
    s, s_next = _batch_of_steps()
    x, v, g = _xv(4, 2, 3, 3)
    noise = torch.randn(x.shape, generator=g)
    out = sde.sde_step(x, v, s, s_next, 0.0, SIGMAS[1], noise=noise)
    ode = sde.ode_step(x, v, s, s_next)
    torch.testing.assert_close(out.mean, ode, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.prev_sample, ode, atol=1e-6, rtol=0)  # any noise: std is 0
    assert torch.all(out.std == 0)


def test_cps_noise_level_zero_is_ode():
    s, s_next = _batch_of_steps()
    x, v, g = _xv(4, 2, 3, 3)
    noise = torch.randn(x.shape, generator=g)
    out = sde.cps_step(x, v, s, s_next, 0.0, noise=noise)
    ode = sde.ode_step(x, v, s, s_next)
    # (1-s')(x - s v) + s'(x + (1-s) v) = x + (s' - s) v
    torch.testing.assert_close(out.mean, ode, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.prev_sample, ode, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# log-prob is the Gaussian density, averaged over non-batch dims, with per-sample sigmas
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_log_prob_matches_torch_normal(sde_type):
    s, s_next = _batch_of_steps()  # shape [B]: one different step per sample
    x, v, g = _xv(4, 3, 5, 5)
    noise = torch.randn(x.shape, generator=g)
    out = sde.stochastic_step(sde_type, x, v, s, s_next, 0.7, SIGMAS[1], noise=noise)
    assert out.log_prob.shape == (4,)
    assert out.std.shape == (4,)
    std = out.std.double().view(-1, 1, 1, 1)
    ref = torch.distributions.Normal(out.mean.double(), std).log_prob(out.prev_sample.double())
    ref = ref.mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.double(), ref, atol=1e-5, rtol=1e-6)
    # and the sample was mean + std * noise
    torch.testing.assert_close(out.prev_sample, out.mean + out.std.view(-1, 1, 1, 1) * noise, atol=1e-6, rtol=0)


def test_per_sample_sigmas_equal_scalar_calls():
    """A batch of different steps gives the same result as one call per step with scalar sigmas."""
    s, s_next = _batch_of_steps()
    x, v, g = _xv(4, 2, 3, 3)
    noise = torch.randn(x.shape, generator=g)
    for sde_type in ("sde", "cps"):
        batched = sde.stochastic_step(sde_type, x, v, s, s_next, 0.7, SIGMAS[1], noise=noise)
        for i in range(4):
            single = sde.stochastic_step(
                sde_type, x[i : i + 1], v[i : i + 1], float(s[i]), float(s_next[i]), 0.7, float(SIGMAS[1]),
                noise=noise[i : i + 1],
            )
            torch.testing.assert_close(batched.prev_sample[i], single.prev_sample[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(batched.log_prob[i], single.log_prob[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Empirical moments and the SD3.5-M sigma_eff reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_empirical_moments_match_mean_and_std(sde_type):
    torch.manual_seed(0)
    s, s_next = _batch_of_steps()
    n = 20000
    x0, v0, _ = _xv(4, 1, 2, seed=1)
    x, v = x0.expand(4, n, 2).contiguous(), v0.expand(4, n, 2).contiguous()  # 20000 draws per sample
    out = sde.stochastic_step(sde_type, x, v, s, s_next, 0.7, SIGMAS[1])
    draws = out.prev_sample  # [4, n, 2]
    mean = out.mean[:, 0]  # [4, 2] (identical over the draw dim)
    std = out.std  # [4]
    emp_mean = draws.mean(dim=1)
    emp_std = draws.std(dim=1)  # [4, 2]
    # standard error of the mean is std / sqrt(n) ~ 0.007 std; of the std ~ 0.005 std
    assert torch.all((emp_mean - mean).abs() <= 5 * std[:, None] / math.sqrt(n))
    torch.testing.assert_close(emp_std, std[:, None].expand(4, 2), rtol=0.03, atol=0)


def test_sde_std_formula():
    """sigma_eff = a sqrt(s / (1 - s)) sqrt(s - s'), with sigma_max instead of s in the denominator at s = 1."""
    a = 0.7
    s, s_next = SIGMAS[:-1].double(), SIGMAS[1:].double()
    s_safe = torch.where(s >= 1.0, SIGMAS[1].double(), s)
    std_dev_t = a * torch.sqrt(s / (1 - s_safe))
    expected = std_dev_t * torch.sqrt(s - s_next)
    x = torch.zeros(10, 4)
    out = sde.sde_step(x, torch.zeros_like(x), SIGMAS[:-1], SIGMAS[1:], a, SIGMAS[1])
    torch.testing.assert_close(out.std.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.std_dev_t.double(), std_dev_t, rtol=1e-5, atol=1e-7)


def test_sd35m_reference_sigma_eff():
    """Spec §2a: shift-3 10-step schedule, a = 0.7. First step: a sqrt(1/(1-s1)) sqrt(1-s1) = a exactly."""
    x = torch.zeros(10, 4)
    out = sde.sde_step(x, torch.zeros_like(x), SIGMAS[:-1], SIGMAS[1:], 0.7, SIGMAS[1])
    ref = torch.tensor([0.70, 0.74, 0.54, 0.45, 0.39, 0.35, 0.32, 0.28, 0.23, 0.006])
    torch.testing.assert_close(out.std, ref, atol=5e-3, rtol=0)  # 2 decimals
    assert out.std[0].item() == pytest.approx(0.7, abs=1e-6)
    assert out.std[-1].item() == pytest.approx(0.0063, abs=5e-4)  # last step nearly deterministic


# ---------------------------------------------------------------------------------------------------
# CPS preserves the coefficients of the rectified-flow marginal
# ---------------------------------------------------------------------------------------------------


def test_cps_coefficients_preserved_algebra():
    """x = (1-s) x0 + s e, v = e - x0 exactly => mean = (1-s') x0 + sqrt(s'^2 - std^2) e; total noise var s'^2."""
    g = torch.Generator().manual_seed(3)
    s, s_next = _batch_of_steps()
    x0 = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    e = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    sv, snv = s.double().view(-1, 1, 1, 1), s_next.double().view(-1, 1, 1, 1)
    x = (1 - sv) * x0 + sv * e
    v = e - x0
    out = sde.cps_step(x, v, s, s_next, 0.7)
    std = out.std.double().view(-1, 1, 1, 1)
    det_noise_coef = torch.sqrt(snv**2 - std**2)
    torch.testing.assert_close(out.mean.double(), (1 - snv) * x0 + det_noise_coef * e, atol=1e-5, rtol=0)
    torch.testing.assert_close((det_noise_coef**2 + std**2).flatten(), s_next.double() ** 2, atol=1e-6, rtol=0)


def test_cps_coefficients_preserved_statistics():
    """Over many (e, z) draws, x' - (1-s') x0 has zero mean and std s' (the schedule's marginal at s')."""
    g = torch.Generator().manual_seed(4)
    s, s_next = _batch_of_steps((0, 3, 6))
    n = 20000
    x0 = torch.randn(3, 1, 2, generator=g).expand(3, n, 2)
    e = torch.randn(3, n, 2, generator=g)
    sv, snv = s.view(-1, 1, 1), s_next.view(-1, 1, 1)
    x = (1 - sv) * x0 + sv * e
    v = e - x0
    z = torch.randn(3, n, 2, generator=g)
    out = sde.cps_step(x, v, s, s_next, 0.7, noise=z)
    resid = out.prev_sample - (1 - snv) * x0  # = sqrt(s'^2-std^2) e + std z
    assert torch.all(resid.mean(dim=1).abs() <= 5 * snv[:, :, 0] / math.sqrt(n))
    torch.testing.assert_close(resid.std(dim=1), snv[:, :, 0].expand(3, 2), rtol=0.03, atol=0)


# ---------------------------------------------------------------------------------------------------
# KL to the reference
# ---------------------------------------------------------------------------------------------------


def test_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(5)
    b, d, n = 3, 50, 20000
    std = torch.tensor([0.3, 0.5, 1.0])
    mean = torch.randn(b, d, generator=g)
    ref_mean = mean + std[:, None] * torch.randn(b, d, generator=g)  # |mu - mu_ref| ~ std
    kl = sde.kl_to_reference(mean, ref_mean, std)  # [B]
    # MC: E_{x ~ p}[log p(x) - log q(x)], log-probs averaged over dims like the KL
    z = torch.randn(n, b, d, generator=g)
    xs = mean + std[:, None] * z  # [n, B, D]
    xs = xs.reshape(n * b, d)
    rep = lambda t: t.unsqueeze(0).expand(n, *t.shape).reshape(n * b, *t.shape[1:])  # noqa: E731
    diff = sde.gaussian_log_prob(xs, rep(mean), rep(std)) - sde.gaussian_log_prob(xs, rep(ref_mean), rep(std))
    mc = diff.view(n, b).double().mean(dim=0)
    # MC std error: sqrt(mean_d(delta^2)/s^2 / (n d)) ~ 1/sqrt(1e6) = 1e-3
    torch.testing.assert_close(mc, kl.double(), atol=1e-2, rtol=2e-2)
    # and the closed form itself: mean_d (mu - mu_ref)^2 / (2 std^2)
    torch.testing.assert_close(kl, ((mean - ref_mean) ** 2).mean(dim=1) / (2 * std**2), atol=1e-6, rtol=1e-6)


def test_kl_zero_and_symmetric():
    g = torch.Generator().manual_seed(6)
    mean = torch.randn(2, 3, 4, 4, generator=g)
    ref = torch.randn(2, 3, 4, 4, generator=g)
    std = torch.tensor([0.2, 0.9])
    assert torch.all(sde.kl_to_reference(mean, mean.clone(), std) == 0)
    torch.testing.assert_close(sde.kl_to_reference(mean, ref, std), sde.kl_to_reference(ref, mean, std))
    assert torch.all(sde.kl_to_reference(mean, ref, std) > 0)


# ---------------------------------------------------------------------------------------------------
# prev_sample given (training recompute) and gradients
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_given_prev_sample_and_gradients(sde_type):
    s, s_next = _batch_of_steps()
    x, v, g = _xv(4, 2, 3, 3)
    v = v.clone().requires_grad_(True)
    prev = torch.randn(x.shape, generator=g).requires_grad_(True)
    out = sde.stochastic_step(sde_type, x, v, s, s_next, 0.7, SIGMAS[1], prev_sample=prev)
    assert torch.equal(out.prev_sample, prev)
    expected = sde.gaussian_log_prob(prev.detach(), out.mean.detach(), out.std)
    torch.testing.assert_close(out.log_prob.detach(), expected, atol=1e-6, rtol=0)
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0  # flows through the mean
    assert prev.grad is None  # x' enters the log-prob detached


def test_gradient_flows_through_mean():
    s, s_next = _batch_of_steps()
    x, v, _ = _xv(4, 2, 3, 3)
    v = v.clone().requires_grad_(True)
    out = sde.sde_step(x, v, s, s_next, 0.7, SIGMAS[1])
    out.mean.sum().backward()
    assert v.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------


def test_stochastic_step_dispatch():
    s, s_next = _batch_of_steps()
    x, v, g = _xv(4, 2, 3, 3)
    noise = torch.randn(x.shape, generator=g)
    a = sde.stochastic_step("sde", x, v, s, s_next, 0.7, SIGMAS[1], noise=noise)
    b = sde.sde_step(x, v, s, s_next, 0.7, SIGMAS[1], noise=noise)
    c = sde.stochastic_step("cps", x, v, s, s_next, 0.7, SIGMAS[1], noise=noise)
    d = sde.cps_step(x, v, s, s_next, 0.7, noise=noise)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)
    assert torch.equal(c.prev_sample, d.prev_sample) and torch.equal(c.log_prob, d.log_prob)
    assert not torch.allclose(a.mean, c.mean)


def test_stochastic_step_unknown_type():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="sde_type"):
        sde.stochastic_step("ode", x, x, 1.0, 0.9, 0.7, 0.96)


def test_inputs_cast_to_fp32():
    s, s_next = _batch_of_steps()
    x, v, _ = _xv(4, 2, 3, 3)
    out = sde.sde_step(x.half(), v.bfloat16(), s, s_next, 0.7, SIGMAS[1])
    assert out.prev_sample.dtype == torch.float32
    assert out.log_prob.dtype == torch.float32
    assert torch.isfinite(out.log_prob).all()
