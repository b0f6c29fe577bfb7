"""Process topology (torchrun, a Kubeflow PyTorchJob, or a single process) and the group-spreading draw.

Environments we accept, in order:
* torchrun (also inside a PyTorchJob pod): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set per process,
  recognised by ``LOCAL_RANK`` / ``TORCHELASTIC_RUN_ID``.
* a PyTorchJob pod running the trainer directly (one process per pod): the operator sets ``RANK`` to the
  **pod index** and ``WORLD_SIZE`` to the number of pods, plus ``MASTER_ADDR`` / ``MASTER_PORT``; it also
  sets ``PET_NNODES`` / ``PET_NPROC_PER_NODE`` / ``PET_NODE_RANK`` / ``PET_MASTER_*`` for torchrun, which
  :func:`torchrun_args` turns into a torchrun command line (the usual entry point of our PyTorchJob).
* nothing set: a single process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env(env: dict[str, str] | None = None) -> DistEnv:
    e = os.environ if env is None else env
    world = int(e.get("WORLD_SIZE", "1"))
    rank = int(e.get("RANK", "0"))
    if "LOCAL_RANK" in e or "TORCHELASTIC_RUN_ID" in e:
        local = int(e.get("LOCAL_RANK", "0"))
    else:  # one process per pod: the pod index is the rank, and the only local process
        local = 0
    if not (0 <= rank < world):
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    addr = e.get("MASTER_ADDR", e.get("PET_MASTER_ADDR", "127.0.0.1"))
    port = int(e.get("MASTER_PORT", e.get("PET_MASTER_PORT", "29500")))
    return DistEnv(rank, world, local, addr, port)


def torchrun_args(env: dict[str, str] | None = None) -> list[str]:
    """torchrun arguments for this pod of a PyTorchJob (``PET_*`` from the operator; RANK = pod index)."""
    e = os.environ if env is None else env
    nnodes = e.get("PET_NNODES", "1")
    nproc = e.get("PET_NPROC_PER_NODE", "1")
    node_rank = e.get("PET_NODE_RANK", e.get("RANK", "0"))
    addr = e.get("PET_MASTER_ADDR", e.get("MASTER_ADDR", "127.0.0.1"))
    port = e.get("PET_MASTER_PORT", e.get("MASTER_PORT", "29500"))
    return [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", f"--node_rank={node_rank}",
            f"--master_addr={addr}", f"--master_port={port}"]


@dataclass
class Draw:
    """This rank's share of one sampling iteration. All tensors [B]."""

    prompt_index: torch.Tensor  # long, index into the prompt set
    group_id: torch.Tensor  # long, unique per (epoch-iteration, drawn prompt): the GRPO group
    sample_seed: torch.Tensor  # long, per-image seed (unique over the whole run)


def draw_groups(num_prompts: int, world_size: int, rank: int, batch_size: int, group_size: int,
                seed: int, iteration: int) -> Draw:
    """Spread G-image groups over ranks (upstream's DistributedKRepeatSampler, made stateless).

    Every rank seeds the same generator with (seed, iteration), draws m = P*B/G prompts (distinct when the
    prompt set is large enough), repeats each G times, shuffles the P*B slots and keeps slice
    [rank*B, (rank+1)*B). So each group is complete within the iteration but spread over ranks.
    """
    total = world_size * batch_size
    if total % group_size:
        raise ValueError(f"group_size {group_size} must divide world_size*batch_size = {total}")
    m = total // group_size
    g = torch.Generator().manual_seed(_mix(seed, iteration))
    if num_prompts >= m:
        prompts = torch.randperm(num_prompts, generator=g)[:m]
    else:
        prompts = torch.randint(num_prompts, (m,), generator=g)
    slots = prompts.repeat_interleave(group_size)  # [P*B]
    groups = (torch.arange(m) + iteration * m).repeat_interleave(group_size)
    perm = torch.randperm(total, generator=g)
    lo, hi = rank * batch_size, (rank + 1) * batch_size
    seeds = torch.tensor([_mix(seed, iteration * total + j) for j in range(lo, hi)], dtype=torch.long)
    return Draw(slots[perm][lo:hi], groups[perm][lo:hi], seeds)


def _mix(*parts: int | str) -> int:
    """Stable 63-bit hash of the parts (used for every seed, so runs are reproducible and resumable)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def seed_for(*parts: int | str) -> int:
    return _mix(*parts)
