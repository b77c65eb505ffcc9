"""SVDD: soft value-based decoding (Li et al. 2024, "Derivative-Free Guidance in Continuous and Discrete
Diffusion Models with Soft Value-Based Decoding"), the posterior-mean variant (SVDD-PM).

At every step M candidates x_{t-1} are drawn from the model's own transition; each is valued by the reward of
its x̂_0, v = r(decode(x̂_0(x_{t-1}))) (an estimate of the soft value α log E[exp(r(x_0)/α) | x_{t-1}]), and
one is kept: the argmax (α = 0, the reference's default) or a draw with weights ∝ exp(v/α). At the last step
the candidates are x_0 and are valued by their reward (the reference takes the first one unscored there).
Cost per prompt: about M denoiser passes and M reward calls per step (the pass valuing the kept candidate is
the one its next step needs). Runs on the shared search core (:mod:`diffalign.steering.search`).
Reference: masa-ue/SVDD-image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings
from diffalign.steering.base import Meter, Particles, SteeringResult
from diffalign.steering.search import search


@dataclass
class SVDDConfig:
    """SVDD settings."""

    particles: int = 4
    """M: candidates drawn per step."""
    temperature: float = 0.0
    """α: keep a candidate with weights ∝ exp(v/α); 0 keeps the argmax."""

    def validate(self, settings: StepSettings, reward) -> list[str]:
        errors = []
        if self.particles < 1:
            errors.append(f"particles must be >= 1, got {self.particles}")
        if self.temperature < 0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if settings.eta <= 0:
            errors.append(f"SVDD draws candidates from the stochastic transition, which needs eta > 0 "
                          f"(got eta = {settings.eta})")
        return errors


def svdd(policy: Policy, prompts: Sequence[str], reward, settings: StepSettings, config: SVDDConfig,
         seed: int = 0) -> SteeringResult:
    """One path per prompt, keeping at each step the best-valued of M candidates (see the module docstring)."""
    errors = config.validate(settings, reward)
    if errors:
        raise ValueError("svdd: " + "; ".join(errors))
    particles, meter = Particles.of(prompts, config.particles, seed), Meter()
    alpha = config.temperature
    found = search(policy, particles, reward, settings, meter, greedy=alpha == 0,
                   log_weights=lambda rewards, log_p, log_q, remaining: rewards / (alpha or 1.0))
    return SteeringResult(list(prompts), found.images, found.latents[:, -1], found.rewards[:, -1],
                          meter.denoiser_passes, meter.gradient_passes, meter.reward_calls)
