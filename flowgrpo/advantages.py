"""GRPO advantages: rewards normalised within each prompt's group (paper Eq. 4).

    A_i = (r_i - mean(r_group)) / (std + eps),   std = std(r_group)  or, with ``global_std``, std(all r)

Stds are population stds (ddof 0, as upstream's numpy). Groups are identified by an integer id (the
epoch-unique id of the prompt draw), so all G images of one draw form exactly one group even if the same
prompt text is drawn twice in an epoch (upstream groups by text; we keep draws apart).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AdvantageStats:
    num_groups: int
    group_size_mean: float
    zero_std_ratio: float  # fraction of groups whose rewards are all identical
    reward_std_mean: float  # mean within-group std


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    global_std: bool = True,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, AdvantageStats]:
    """rewards [N] float, group_ids [N] long -> advantages [N] fp32, stats."""
    r = rewards.double()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)  # [N], [K]
    k = counts.numel()
    f64 = dict(dtype=torch.float64, device=r.device)
    sums = torch.zeros(k, **f64).index_add_(0, inverse, r)
    means = sums / counts  # [K]
    sq = torch.zeros(k, **f64).index_add_(0, inverse, (r - means[inverse]) ** 2)
    group_std = torch.sqrt(sq / counts)  # [K] population std
    std = r.std(unbiased=False) if global_std else group_std[inverse]  # [] or [N]
    adv = (r - means[inverse]) / (std + eps)  # [N]
    # A group of identical rewards must give exactly 0 (keep_nonzero drops on ``!= 0``); in fp64 the
    # rounded group mean can differ from the rewards by an ulp, leaving ~1e-13 advantages.
    g_max = torch.full((k,), -torch.inf, **f64).scatter_reduce_(0, inverse, r, "amax")
    g_min = torch.full((k,), torch.inf, **f64).scatter_reduce_(0, inverse, r, "amin")
    constant = g_max == g_min  # [K]
    adv = torch.where(constant[inverse], torch.zeros_like(adv), adv)
    stats = AdvantageStats(
        num_groups=k,
        group_size_mean=float(counts.double().mean()),
        zero_std_ratio=float(constant.double().mean()),
        reward_std_mean=float(group_std.mean()),
    )
    return adv.float(), stats


def keep_nonzero(
    advantages: torch.Tensor, num_batches: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices of samples to train on: drop zero-advantage samples (they carry no policy gradient),
    then re-add random dropped ones until the count is a positive multiple of ``num_batches`` so every
    rank still runs the same number of micro-batches (DDP needs it). advantages [N] -> LongTensor [M].
    """
    n = advantages.numel()
    keep = torch.nonzero(advantages != 0).flatten()
    dropped = torch.nonzero(advantages == 0).flatten()
    target = max(num_batches, -(-keep.numel() // num_batches) * num_batches)
    need = min(target - keep.numel(), dropped.numel())
    if need > 0:
        extra = dropped[torch.randperm(dropped.numel(), generator=generator)[:need]]
        keep = torch.cat([keep, extra])
    keep = keep.sort().values
    if keep.numel() % num_batches:  # can only happen if n itself is not a multiple
        raise ValueError(f"{n} samples cannot be split into {num_batches} micro-batches")
    return keep
