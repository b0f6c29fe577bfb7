"""Pure fp32 step functions of the flow-matching sampler, with Gaussian log-probabilities.

Conventions (rectified flow, as SD3 / diffusers ``FlowMatchEulerDiscreteScheduler``):
``x_s = (1 - s) x0 + s eps`` and the model predicts the velocity ``v ~ eps - x0``; sampling runs from
``s = 1`` (noise) to ``s = 0`` (data). A step goes from ``sigma`` (s) to ``sigma_next`` (s'), ``dt = s' - s < 0``.

Every function takes per-sample noise levels (``sigma``/``sigma_next`` of shape [B], or scalars) so a
batch may hold transitions from different steps (Flow-GRPO-Fast windows differ per sampling batch).
All inputs are cast to fp32 (bf16/fp16 overflow in these formulas).

Log-probabilities follow the upstream convention: the elementwise Gaussian log-density (all constants
kept) is **averaged** over the non-batch dims, giving one scalar per sample. Per-element averages are
why clip ranges are ~1e-4.

Where we differ from upstream (flow_grpo @ 9745241), deliberately:
* CPS log-prob: upstream returns ``-(x' - mu)^2`` (no 1/(2 sigma^2), no constants). We return the true
  Gaussian log-density, so the sampler, the trainer and GRPO-Guard share one definition and the
  log-prob tests hold for every step type. The upstream "log-ratio" is 2 sigma^2 times ours; the CPS
  presets' clip ranges are rescaled accordingly (1e-5 upstream -> 7e-6 here, sigma ~ 0.85 in the window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """One sampler transition ``x -> x'``.

    prev_sample: [B, *D] the next latent x' (given, or sampled as mean + std * noise)
    log_prob:    [B]     mean over D of log N(x'; mean, std^2)
    mean:        [B, *D] mean of the transition
    std:         [B]     std of the transition (sigma_eff = std_dev_t * sqrt(-dt) for 'sde')
    std_dev_t:   [B]     the SDE diffusion coefficient before sqrt(-dt) ('sde'); equals std for 'cps'
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    std_dev_t: torch.Tensor


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Scalar or [B] -> fp32 [B, 1, ..., 1] broadcastable against ``like`` [B, *D]."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch dims of the elementwise log N(x; mean, std^2).

    x, mean: [B, *D]; std: [B] (or broadcastable [B, 1, ...]) -> [B]
    """
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    std = _per_sample(std, x) if std.ndim <= 1 else std
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI  # [B, *D]
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def _transition(mean: torch.Tensor, std: torch.Tensor, std_dev_t: torch.Tensor, noise: torch.Tensor | None,
                prev_sample: torch.Tensor | None) -> StepOutput:
    """Sample x' = mean + std z (unless ``prev_sample`` is given) and score it. mean [B, *D]; std [B, 1...]."""
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(mean)
        prev_sample = mean + std * noise.float()
    prev_sample = prev_sample.float()
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    return StepOutput(prev_sample, log_prob, mean, std.flatten(), std_dev_t.flatten())


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Euler step of dx = v ds: ``x + (s' - s) v``. x, v: [B, *D] -> [B, *D] fp32."""
    x, v = x.float(), v.float()
    dt = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    return x + dt * v


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    sigma_max,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """Flow-GRPO SDE step (Euler-Maruyama of the marginal-preserving reverse SDE, paper Eq. 9-12).

        dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dw,   sigma_t = a sqrt(t / (1 - t))

    ``sigma_max`` replaces t in the denominator at t == 1 (upstream uses ``sigmas[1]``) to avoid 1/0.
    mean = x (1 + sigma_t^2 dt / (2t)) + v (1 + sigma_t^2 (1 - t) / (2t)) dt
    x'   = mean + sigma_t sqrt(-dt) z
    With noise_level 0 the mean is exactly the Euler step and the log-prob is undefined (std 0).
    x, v: [B, *D]; sigma, sigma_next, sigma_max: scalar or [B]; noise, prev_sample: [B, *D].
    """
    x, v = x.float(), v.float()
    s = _per_sample(sigma, x)  # [B, 1...]
    s_next = _per_sample(sigma_next, x)
    s_max = _per_sample(sigma_max, x)
    dt = s_next - s  # negative
    s_safe = torch.where(s >= 1.0, s_max, s)
    std_dev_t = noise_level * torch.sqrt(s / (1 - s_safe))  # [B, 1...]
    mean = x * (1 + std_dev_t**2 * dt / (2 * s)) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    std = std_dev_t * torch.sqrt(-dt)  # [B, 1...]
    return _transition(mean, std, std_dev_t, noise, prev_sample)


def cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """Coefficients-Preserving Sampling step (arXiv 2509.05952).

    std  = s' sin(a pi / 2)
    x0^  = x - s v,  x1^ = x + (1 - s) v                 (predicted data / predicted noise)
    mean = (1 - s') x0^ + sqrt(s'^2 - std^2) x1^,   x' = mean + std z
    The total noise coefficient at s' stays exactly s' (deterministic part + injected noise), so the
    marginal keeps the schedule. a = 0 gives the Euler step. Log-prob: true Gaussian (see module doc).
    """
    x, v = x.float(), v.float()
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    std = s_next * math.sin(noise_level * math.pi / 2)  # [B, 1...]
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    mean = (1 - s_next) * x0_hat + torch.sqrt(torch.clamp(s_next**2 - std**2, min=0.0)) * x1_hat
    return _transition(mean, std, std, noise, prev_sample)


def stochastic_step(
    sde_type: str,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    sigma_max,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """Dispatch on ``sde_type`` ('sde' | 'cps'); the one entry point used by rollout and loss."""
    if sde_type == "sde":
        return sde_step(x, v, sigma, sigma_next, noise_level, sigma_max, noise, prev_sample)
    if sde_type == "cps":
        return cps_step(x, v, sigma, sigma_next, noise_level, noise, prev_sample)
    raise ValueError(f"sde_type={sde_type!r}: expected 'sde' or 'cps'")


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, std^2) || N(ref_mean, std^2) ) per element, averaged over non-batch dims -> [B].

    Closed form for two Gaussians with the same std: (mean - ref_mean)^2 / (2 std^2) (paper Eq. 13 uses
    std = sigma_t sqrt(dt); upstream passes sigma_t alone, which up-weights late steps - the recipe
    chooses which via ``train.kl_uses_dt``). mean, ref_mean: [B, *D]; std: [B].
    """
    mean, ref_mean = mean.float(), ref_mean.float()
    kl = (mean - ref_mean) ** 2 / (2 * _per_sample(std, mean) ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
