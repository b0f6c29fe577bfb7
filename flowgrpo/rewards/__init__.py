"""Rewards: the interface, the registry and the in-process rewards."""

from flowgrpo.rewards.base import (KNOWN_REWARDS, REGISTRY, Reward, RewardOutput, WeightedReward, as_uint8,
                                   build_reward, register)
from flowgrpo.rewards import clip_rewards, geneval, imagereward, jpeg, ocr, vlm  # noqa: F401  (registration)

__all__ = ["KNOWN_REWARDS", "REGISTRY", "Reward", "RewardOutput", "WeightedReward", "as_uint8", "build_reward",
           "register"]
