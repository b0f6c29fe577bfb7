"""Rewards: the interface, the registry and the in-process rewards (each module is imported when its reward
is first built; see ``base._PROVIDERS``)."""

from flowgrpo.rewards.base import (KNOWN_REWARDS, REGISTRY, Reward, RewardOutput, WeightedReward, as_uint8,
                                   build_reward, register)

__all__ = ["KNOWN_REWARDS", "REGISTRY", "Reward", "RewardOutput", "WeightedReward", "as_uint8", "build_reward",
           "register"]
