"""Test-time steering: the same Policy, sampler and Reward objects as training, spent at sampling time instead.

Every method has one signature, ``method(policy, prompts, reward, settings, config, seed=0) → SteeringResult``
(one image per prompt, its reward, and the denoiser passes and reward calls it spent, so methods can be
compared at equal compute), and a config whose ``particles`` is its width:

- ``best-of-n`` (:mod:`~diffalign.steering.best_of_n`): N independent samples, the best kept;
- ``fk`` (:mod:`~diffalign.steering.fk`): Feynman-Kac particle resampling by reward potentials;
- ``svdd`` (:mod:`~diffalign.steering.svdd`): per-step selection among M candidates by the reward of x̂_0;
- ``guidance`` (:mod:`~diffalign.steering.guidance`): the reward's gradient through x̂_0 added to each step;
- ``rcgd`` (:mod:`~diffalign.steering.rcgd`): a reward model on the noisy latents pulls each step toward a target
  reward (its ``reward`` is that :class:`~diffalign.models.latent_reward.LatentRewardModel`).

SVDD and DAV's E-step (:mod:`diffalign.algorithms.dav`) run on one search core (:mod:`~diffalign.steering.search`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffalign.steering.base import Meter, SteeringResult
from diffalign.steering.best_of_n import BestOfNConfig, best_of_n
from diffalign.steering.fk import FKConfig, fk
from diffalign.steering.guidance import GuidanceConfig, guidance
from diffalign.steering.rcgd import RCGDConfig, rcgd
from diffalign.steering.svdd import SVDDConfig, svdd


@dataclass(frozen=True)
class Steerer:
    """A steering method: its config class and its function."""

    config_class: type
    run: Callable[..., SteeringResult]


STEERERS: dict[str, Steerer] = {
    "best-of-n": Steerer(BestOfNConfig, best_of_n),
    "fk": Steerer(FKConfig, fk),
    "svdd": Steerer(SVDDConfig, svdd),
    "guidance": Steerer(GuidanceConfig, guidance),
    "rcgd": Steerer(RCGDConfig, rcgd),
}


def steerer(name: str) -> Steerer:
    if name not in STEERERS:
        raise ValueError(f"unknown steering method {name!r}; choose one of {', '.join(STEERERS)}")
    return STEERERS[name]


__all__ = ["STEERERS", "BestOfNConfig", "FKConfig", "GuidanceConfig", "Meter", "RCGDConfig", "SVDDConfig", "Steerer",
           "SteeringResult", "best_of_n", "fk", "guidance", "rcgd", "steerer", "svdd"]
