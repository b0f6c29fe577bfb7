"""Process topology from torchrun / PyTorchJob environments, and the group-spreading draw."""

from __future__ import annotations

import pytest
import torch

from flowgrpo.distributed import draw_groups, read_env, torchrun_args


def test_single_process_default():
    e = read_env({})
    assert (e.rank, e.world_size, e.local_rank, e.is_main) == (0, 1, 0, True)


def test_torchrun_env():
    e = read_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                  "MASTER_PORT": "23456", "TORCHELASTIC_RUN_ID": "x"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (5, 8, 1, "10.0.0.1", 23456)


def test_pytorchjob_pod_without_torchrun():
    """A PyTorchJob's RANK is the pod index; without torchrun each pod is one process (local rank 0)."""
    e = read_env({"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr) == (2, 3, 0, "job-master-0")


def test_torchrun_args_from_pytorchjob_pet_variables():
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-master-0",
           "PET_MASTER_PORT": "23456", "RANK": "1"}
    assert torchrun_args(env) == ["--nnodes=2", "--nproc_per_node=8", "--node_rank=1",
                                  "--master_addr=job-master-0", "--master_port=23456"]
    # older operators set only RANK (the pod index) and MASTER_*: the node rank is the pod index
    assert "--node_rank=3" in torchrun_args({"RANK": "3", "MASTER_ADDR": "m", "MASTER_PORT": "1"})


def test_bad_rank_is_rejected():
    with pytest.raises(ValueError, match="RANK=4"):
        read_env({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize("world,batch,group", [(1, 8, 4), (2, 8, 8), (4, 9, 12), (3, 4, 6)])
def test_groups_are_complete_and_spread(world, batch, group):
    draws = [draw_groups(100, world, r, batch, group, seed=7, iteration=3) for r in range(world)]
    gids = torch.cat([d.group_id for d in draws])
    prompts = torch.cat([d.prompt_index for d in draws])
    seeds = torch.cat([d.sample_seed for d in draws])
    assert gids.numel() == world * batch
    ids, counts = gids.unique(return_counts=True)
    assert (counts == group).all()  # every group complete within the iteration
    for g in ids:  # one prompt per group, distinct prompts across groups
        assert prompts[gids == g].unique().numel() == 1
    assert prompts.unique().numel() == ids.numel()
    assert seeds.unique().numel() == seeds.numel()  # per-image noise seeds never repeat
    if group > batch:  # a group larger than a rank's batch must span ranks
        owners = {int(g): {r for r, d in enumerate(draws) if (d.group_id == g).any()} for g in ids}
        assert all(len(o) > 1 for o in owners.values())


def test_draw_is_deterministic_and_changes_with_iteration():
    a = draw_groups(50, 2, 1, 8, 4, seed=1, iteration=0)
    b = draw_groups(50, 2, 1, 8, 4, seed=1, iteration=0)
    c = draw_groups(50, 2, 1, 8, 4, seed=1, iteration=1)
    assert torch.equal(a.prompt_index, b.prompt_index) and torch.equal(a.sample_seed, b.sample_seed)
    assert not torch.equal(a.sample_seed, c.sample_seed)
    assert set(a.group_id.tolist()).isdisjoint(c.group_id.tolist())  # group ids are unique per iteration


def test_small_prompt_set_repeats_prompts_but_keeps_groups_apart():
    d = draw_groups(2, 1, 0, 16, 2, seed=0, iteration=0)  # 8 groups from only 2 prompts
    assert d.group_id.unique().numel() == 8 and d.prompt_index.unique().numel() <= 2


def test_group_must_divide_global_batch():
    with pytest.raises(ValueError, match="must divide"):
        draw_groups(10, 1, 0, 9, 24, seed=0, iteration=0)
