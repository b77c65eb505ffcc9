"""Feynman-Kac steering (Singhal et al. 2025, "A General Framework for Inference-time Scaling and Steering of
Diffusion Models"): k particles per prompt, resampled along the way by a potential of their rewards.

At each resampling step s the particles' x̂_0 (predicted from the step's input) is decoded and scored, r_s, and
each particle's log-weight grows by a log-potential (:func:`potentials`):

    diff: λ (r_s − r_prev)    max: λ max(r_s, r_prev)    add: λ (r_s + r_prev)    rt: λ r_s

where r_prev is what the particle carried from its last scoring (0 at first; the running max for ``max`` and the
running sum for ``add``, as in the reference code). Particles are then resampled multinomially from the
normalised weights (always, or, ``adaptive``, only when the effective sample size drops below k/2) and the
weights reset. Without resampling the weights carry over, as sequential importance sampling requires (the
reference code drops them).

The product of potentials along a lineage must equal exp(λ r(x_0)) for the particles to target
p(x_0) exp(λ r(x_0)): ``diff`` telescopes to it; for ``max``, ``add`` and ``rt`` the final step's weight is
exp(λ r(x_0)) divided by the lineage's past potentials (the final-step correction). ``select="sample"`` returns
one particle drawn from those final weights (a sample of the tilted target); ``select="best"`` (default) the
highest-reward particle, as compared against best-of-k in the paper. Reference: zacharyhorvitz/Fk-Diffusion-Steering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings
from diffalign.steering.base import (
    Meter, Particles, SteeringResult, best_per_prompt, draw, effective_sample_size, propagate,
)

Potential = Literal["diff", "max", "add", "rt"]


def potentials(rewards: torch.Tensor, previous_rewards: torch.Tensor, lam: float, kind: Potential) -> torch.Tensor:
    """The unnormalised log-potentials ``[..., k]`` of particles with rewards ``[..., k]`` that carried
    ``previous_rewards`` from their last scoring (NaN → −inf: never resampled)."""
    if kind == "diff":
        value = rewards - previous_rewards
    elif kind == "max":
        value = torch.maximum(rewards, previous_rewards)
    elif kind == "add":
        value = rewards + previous_rewards
    elif kind == "rt":
        value = rewards
    else:
        raise ValueError(f"potential must be 'diff', 'max', 'add' or 'rt', got {kind!r}")
    return torch.nan_to_num(lam * value, nan=-torch.inf)


def carried(rewards: torch.Tensor, previous_rewards: torch.Tensor, kind: Potential) -> torch.Tensor:
    """What a particle carries to its next scoring: the running max (``max``), sum (``add``) or last reward."""
    if kind == "max":
        return torch.maximum(rewards, previous_rewards)
    return rewards + previous_rewards if kind == "add" else rewards


@dataclass
class FKConfig:
    """FK steering settings (defaults: the reference's, with resampling steps counted in sampler steps)."""

    particles: int = 4
    """k: particles per prompt."""
    potential: Potential = "diff"
    """diff, max, add or rt (see the module docstring)."""
    lam: float = 10.0
    """λ: the potential's inverse temperature."""
    resample_every: int = 5
    """Steps between resampling steps."""
    resample_start: int = 5
    """First resampling step (0-based sampler step)."""
    resample_end: int | None = None
    """Last resampling step before the final one (None: up to the end)."""
    adaptive: bool = True
    """Resample only when the effective sample size is below k/2 (else at every resampling step)."""
    select: Literal["best", "sample"] = "best"
    """Return the highest-reward particle, or one drawn from the final weights."""

    def validate(self, settings: StepSettings, reward) -> list[str]:
        errors = []
        if self.particles < 1:
            errors.append(f"particles must be >= 1, got {self.particles}")
        if self.resample_every < 1:
            errors.append(f"resample_every must be >= 1, got {self.resample_every}")
        if self.resample_start < 0:
            errors.append(f"resample_start must be >= 0, got {self.resample_start}")
        if self.potential not in ("diff", "max", "add", "rt"):
            errors.append(f"potential must be 'diff', 'max', 'add' or 'rt', got {self.potential!r}")
        if self.select not in ("best", "sample"):
            errors.append(f"select must be 'best' or 'sample', got {self.select!r}")
        if settings.eta <= 0:
            errors.append(f"FK steering resamples noisy particles, which needs eta > 0 (got eta = {settings.eta}: "
                          "resampled copies of a deterministic sampler stay identical)")
        return errors

    def resampling_steps(self, num_steps: int) -> set[int]:
        """The 0-based sampler steps after which particles are scored and resampled (the final step apart)."""
        end = num_steps - 2 if self.resample_end is None else min(self.resample_end, num_steps - 2)
        return set(range(self.resample_start, end + 1, self.resample_every))


class _Population:
    """The particles' weights: log-weights since the last resampling, carried rewards, lineage log-potentials."""

    def __init__(self, n: int, k: int, config: FKConfig, generator: torch.Generator):
        self.config, self.generator, self.k = config, generator, k
        self.log_weights = torch.zeros(n, k)
        self.previous = torch.zeros(n, k)
        self.lineage = torch.zeros(n, k)

    def weigh(self, rewards: torch.Tensor) -> None:
        log_g = potentials(rewards, self.previous, self.config.lam, self.config.potential)
        self.previous = carried(rewards, self.previous, self.config.potential)
        self.log_weights = self.log_weights + log_g
        self.lineage = self.lineage + log_g

    def resample(self, latents: torch.Tensor) -> torch.Tensor:
        """Resamples the prompts that need it; returns the latents ``[n·k, ...]`` reordered."""
        n = self.log_weights.shape[0]
        need = torch.ones(n, dtype=torch.bool)
        if self.config.adaptive:
            need = effective_sample_size(self.log_weights) < self.k / 2
        index = torch.arange(self.k).expand(n, self.k).clone()
        if need.any():
            index[need] = draw(self.log_weights[need], self.k, self.generator)
            self.previous = torch.gather(self.previous, 1, index)
            self.lineage = torch.gather(self.lineage, 1, index)
            self.log_weights[need] = 0.0
        rows = (torch.arange(n)[:, None] * self.k + index).flatten()
        return latents[rows.to(latents.device)]

    def final_log_weights(self, rewards: torch.Tensor) -> torch.Tensor:
        """The weights of the final particles: the last potential, corrected so a lineage's product is
        exp(λ r(x_0)) (``diff`` telescopes; ``max``, ``add``, ``rt`` divide by the past potentials)."""
        if self.config.potential == "diff":
            last = potentials(rewards, self.previous, self.config.lam, "diff")
        else:
            last = torch.nan_to_num(self.config.lam * rewards, nan=-torch.inf) - self.lineage
        return self.log_weights + last


def fk(policy: Policy, prompts: Sequence[str], reward, settings: StepSettings, config: FKConfig,
       seed: int = 0) -> SteeringResult:
    """FK steering of ``config.particles`` particles per prompt (see the module docstring)."""
    errors = config.validate(settings, reward)
    if errors:
        raise ValueError("fk: " + "; ".join(errors))
    particles, meter = Particles.of(prompts, config.particles, seed), Meter()
    population = _Population(len(prompts), config.particles, config, particles.selection_generator())
    steps = config.resampling_steps(settings.num_inference_steps)

    def after_step(s: int, step, latents: torch.Tensor) -> torch.Tensor:
        if s not in steps:
            return latents
        rewards = meter.score(reward, policy.decode(step.x0_pred), particles.rows)
        population.weigh(particles.grouped(rewards.cpu()))
        return population.resample(latents)

    x0 = propagate(policy, particles, settings, meter, after_step)
    images = policy.decode(x0)
    rewards = meter.score(reward, images, particles.rows)
    if config.select == "best":
        return best_per_prompt(particles, x0, images, rewards, meter)
    chosen = draw(population.final_log_weights(particles.grouped(rewards.cpu())), 1, population.generator).flatten()
    rows = torch.arange(len(prompts)) * config.particles + chosen
    return SteeringResult(list(prompts), images[rows], x0[rows], rewards[rows], meter.denoiser_passes,
                          meter.gradient_passes, meter.reward_calls)
