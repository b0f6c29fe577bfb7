"""The Flow-GRPO objective for one micro-batch of transitions at one step (paper Eq. 5-6).

    J = E[ min(r A, clip(r, 1 - eps, 1 + eps) A) ] - beta KL(pi_theta || pi_ref),   r = p_theta(x'|x) / p_old(x'|x)

We minimise ``L = mean_B max(-A r, -A clip(r)) + beta * kl``.

GRPO-Guard (arXiv 2510.22319), behind ``guard=True``:
* RatioNorm: with x' = mu_old + s z (s = transition std), log r = z.(mu_t - mu_o)/s - |mu_t - mu_o|^2/(2 s^2)
  (means over dims). Adding back the bias b = mean(|mu_t - mu_o|^2)/(2 s^2) and multiplying by s gives a
  zero-mean log-ratio whose scale no longer depends on the step: log r_norm = (log r + b) * s.
  Upstream uses one scalar b and s per micro-batch; we use the per-sample b and s (exact cancellation).
* Gradient reweighting: the step's policy term is divided by |dt| (= s^2 / sigma_t^2), equalising per-step
  gradient magnitudes.
"""

from __future__ import annotations

import torch


def ratio_norm_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """GRPO-Guard normalised log-ratio. log_prob, old_log_prob, std: [B]; mean, old_mean: [B, *D] -> [B]."""
    dims = tuple(range(1, mean.ndim))
    bias = ((mean.float() - old_mean.float()) ** 2).mean(dim=dims) / (2 * std.float() ** 2)  # [B]
    return (log_prob - old_log_prob + bias) * std.float()


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate. log_ratio, advantages, weights: [B] -> (scalar loss, ratio [B])."""
    ratio = torch.exp(log_ratio)  # [B]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)  # [B]
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean(), ratio


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
    beta: float = 0.0,
    kl: torch.Tensor | None = None,
    guard: bool = False,
    mean: torch.Tensor | None = None,
    old_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    dt: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss for one micro-batch at one step.

    log_prob [B] (current policy, with grad), old_log_prob [B] (sampler), advantages [B] (unclipped),
    kl [B] per-sample KL to the reference (needed when beta > 0); for ``guard``: mean/old_mean [B, *D],
    std [B] transition std, dt [B] step size. Returns (loss, detached stats).
    """
    if beta > 0 and kl is None:
        raise ValueError("beta > 0 needs the per-sample kl to the reference policy")
    adv = torch.clamp(advantages.float(), -adv_clip_max, adv_clip_max)  # [B]
    raw_log_ratio = log_prob - old_log_prob  # [B]
    weights = None
    if guard:
        if mean is None or old_mean is None or std is None or dt is None:
            raise ValueError("GRPO-Guard needs mean, old_mean, std and dt")
        log_ratio = ratio_norm_log_ratio(log_prob, old_log_prob, mean, old_mean, std)
        weights = 1.0 / dt.float().abs()
    else:
        log_ratio = raw_log_ratio
    policy_loss, ratio = clipped_surrogate(log_ratio, adv, clip_range, weights)
    loss = policy_loss
    kl_mean = torch.zeros((), device=log_prob.device)
    if kl is not None:
        kl_mean = kl.mean()
        if beta > 0:
            loss = loss + beta * kl_mean
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "policy_loss": policy_loss.detach(),
            "kl": kl_mean.detach(),
            "ratio_mean": ratio.mean(),
            "approx_kl": 0.5 * (raw_log_ratio**2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "clipfrac_gt_one": (ratio > 1.0 + clip_range).float().mean(),
            "clipfrac_lt_one": (ratio < 1.0 - clip_range).float().mean(),
        }
    return loss, stats
