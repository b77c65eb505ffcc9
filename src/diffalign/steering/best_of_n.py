"""Best-of-N: N independent samples per prompt, the one the reward likes best returned.

The compute-matched baseline of every particle method (FK steering, SVDD, DAS compare against it): N full
trajectories and N reward calls per prompt, no intermediate scoring, no gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings
from diffalign.steering.base import Meter, Particles, SteeringResult, best_per_prompt, propagate


@dataclass
class BestOfNConfig:
    """Best-of-N settings."""

    particles: int = 4
    """N: independent samples per prompt."""

    def validate(self, settings: StepSettings, reward) -> list[str]:
        return [] if self.particles >= 1 else [f"particles must be >= 1, got {self.particles}"]


def best_of_n(policy: Policy, prompts: Sequence[str], reward, settings: StepSettings, config: BestOfNConfig,
              seed: int = 0) -> SteeringResult:
    """N samples per prompt from the sampler; the highest-reward one of each prompt."""
    errors = config.validate(settings, reward)
    if errors:
        raise ValueError("best_of_n: " + "; ".join(errors))
    particles, meter = Particles.of(prompts, config.particles, seed), Meter()
    x0 = propagate(policy, particles, settings, meter)
    images = policy.decode(x0)
    return best_per_prompt(particles, x0, images, meter.score(reward, images, particles.rows), meter)
