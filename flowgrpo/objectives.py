"""Objectives beside GRPO, on the same recorded SDE transitions (one trained step k of a micro-batch at a time).

* DPO / OnlineDPO (Diffusion-DPO, Wallace et al. 2024, Eq. 14 in its per-step form): pairs (w, l) of images
  of the same prompt, w scored higher. With transition log-probs log p(x_{k+1} | x_k) of the policy and of
  the reference,

      L = -log sigmoid( beta * [ (log p_theta(w) - log p_ref(w)) - (log p_theta(l) - log p_ref(l)) ] )

  Our log-probs are means over latent dimensions, so beta is on that scale: a mean-over-dims log-prob
  difference is ~ 1 / (2 s^2) (s = transition std, ~0.1-0.3 at noise_level 0.7) times the MSE difference
  Diffusion-DPO's beta (2000-5000) multiplies, hence a default of 200.
* SFT / OnlineSFT (best-of-group regression, the "RWR with the best sample" baseline): maximise the
  transition log-likelihood of the best image of each group, L = -mean log p_theta(x_{k+1} | x_k): for a
  Gaussian step this regresses the policy's mean onto the recorded next latent.

"Online" variants learn from the current policy's samples; the offline ones from the reference policy's
(the base model: LoRA disabled, or the frozen initial copy), like a fixed preference / SFT dataset that is
re-sampled each epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECTIVES = ("grpo", "dpo", "online_dpo", "sft", "online_sft")
OFFLINE = ("dpo", "sft")  # samples come from the reference policy


def dpo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All inputs [P] (one per pair). Returns (scalar loss, detached stats)."""
    margin = (logp_w - ref_w) - (logp_l - ref_l)  # [P] implicit reward margin / beta
    loss = -F.logsigmoid(beta * margin).mean()
    with torch.no_grad():
        stats = {"loss": loss.detach(), "dpo_margin": margin.mean(), "dpo_accuracy": (margin > 0).float().mean()}
    return loss, stats


def sft_loss(logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logp [M]: the policy's transition log-probs of best-of-group samples. Returns (loss, stats)."""
    loss = -logp.mean()
    return loss, {"loss": loss.detach(), "sft_nll": loss.detach()}


def best_of_group(rewards: torch.Tensor, group_max: torch.Tensor, group_min: torch.Tensor) -> torch.Tensor:
    """Indices of samples whose reward equals the best of their group (over every rank), skipping groups
    whose members all scored the same (nothing to prefer). All inputs [N] -> LongTensor [M]."""
    return torch.nonzero((rewards >= group_max) & (group_max > group_min)).flatten()


def preference_pairs(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(winners, losers) LongTensors [P]: for each group present in this rank's samples, its best and worst
    local members, when they scored differently. A group spread over ranks yields one pair per rank (each a
    valid same-prompt preference); on one process it is the group's best vs worst."""
    wins, loses = [], []
    for g in torch.unique(group_ids).tolist():
        idx = torch.nonzero(group_ids == g).flatten()
        r = rewards[idx]
        hi, lo = int(torch.argmax(r)), int(torch.argmin(r))
        if r[hi] > r[lo]:
            wins.append(int(idx[hi]))
            loses.append(int(idx[lo]))
    return torch.tensor(wins, dtype=torch.long), torch.tensor(loses, dtype=torch.long)


def micro_batches(n: int, num_batches: int) -> list[torch.Tensor]:
    """Exactly ``num_batches`` chunks of row indices 0..n-1, repeated cyclically so no chunk is empty: every
    rank then runs the same number of backward passes and optimizer steps as a GRPO epoch (DDP needs the
    count to match across ranks). n must be > 0."""
    if n <= 0:
        raise ValueError("micro_batches needs at least one row")
    rows = torch.arange(max(num_batches, -(-n // num_batches) * num_batches)) % n
    return list(rows.chunk(num_batches))
