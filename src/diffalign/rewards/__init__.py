"""Rewards: the contract (:class:`Reward`), a registry (:func:`get`, :func:`names`) and the registered rewards."""

from diffalign.rewards import (  # noqa: F401  (registers the rewards)
    aesthetic, classifier, clipscore, composite, hpsv2, http, imagereward, jpeg, ocr, pickscore, shapes,
    shapes_learned, simple,
)
from diffalign.rewards.base import Reward, RewardError, RewardOutput
from diffalign.rewards.registry import get, names, register

__all__ = ["Reward", "RewardError", "RewardOutput", "get", "names", "register"]
