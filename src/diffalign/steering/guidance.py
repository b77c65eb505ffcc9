"""Reward-gradient guidance on x̂_0 (DPS, Chung et al. 2023, in its reward form; Universal Guidance's
self-recurrence, Bansal et al. 2023).

Each step runs the denoiser on x_t with gradients on, decodes x̂_0(x_t), scores it with a differentiable reward
and nudges the sampled x_{t-1} up the reward's gradient through the denoiser, decoder and reward:

    x_{t-1} = μ_θ(x_t) + σ_t z + scale · ∇_{x_t} r(decode(x̂_0(x_t)))

With ``repeats`` > 1 the guided x_{t-1} is re-noised back to x_t with q(x_t | x_{t-1}) (fresh noise) and the
step repeated, ``repeats`` times in all (universal guidance's per-step self-recurrence). ``particles`` K runs
K guided samples per prompt and returns the highest-reward one (K = 1: plain guidance). Each step costs one
forward and one backward pass per particle and repeat, and a reward call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings, initial_noise, per_sample_noise
from diffalign.samplers import previous_timestep, renoise
from diffalign.steering.base import Meter, Particles, SteeringResult, best_per_prompt


@dataclass
class GuidanceConfig:
    """Reward-gradient guidance settings."""

    particles: int = 1
    """Guided samples per prompt (the highest-reward one is returned)."""
    scale: float = 1.0
    """Step size on ∇_{x_t} r (in latent units per unit of reward)."""
    repeats: int = 1
    """Times each step is taken (re-noising in between); 1 = no self-recurrence."""

    def validate(self, settings: StepSettings, reward) -> list[str]:
        errors = []
        if self.particles < 1:
            errors.append(f"particles must be >= 1, got {self.particles}")
        if self.repeats < 1:
            errors.append(f"repeats must be >= 1, got {self.repeats}")
        if reward is not None and not reward.differentiable:
            errors.append(f"gradient guidance backpropagates through the reward, but reward {reward.name!r} is not "
                          "differentiable; choose a differentiable one (e.g. shapes_learned, aesthetic, pickscore, "
                          "clipscore, brightness)")
        return errors


def guidance(policy: Policy, prompts: Sequence[str], reward, settings: StepSettings, config: GuidanceConfig,
             seed: int = 0) -> SteeringResult:
    """Reward-gradient-guided sampling (see the module docstring)."""
    errors = config.validate(settings, reward)
    if errors:
        raise ValueError("guidance: " + "; ".join(errors))
    particles, meter = Particles.of(prompts, config.particles, seed), Meter()
    rows, shape, device, schedule = particles.rows, policy.latent_shape, policy.device, policy.schedule
    _, conditioning = particles.encode(policy, settings)
    generators = particles.step_generators()
    timesteps = schedule.timesteps(settings.num_inference_steps).to(device)
    x = initial_noise(particles.seeds, shape, device)
    for t in timesteps:
        t_prev = previous_timestep(t, schedule.num_train_timesteps, settings.num_inference_steps)
        for repeat in range(config.repeats):
            if repeat:
                x = renoise(x, per_sample_noise(generators, shape, device), t, t_prev, schedule.alphas_cumprod,
                            final_alpha_cumprod=schedule.final_alpha_cumprod)
            noise = per_sample_noise(generators, shape, device) if settings.eta > 0 else None
            with torch.enable_grad():
                x_t = x.detach().requires_grad_(True)
                step = meter.denoise(policy, x_t, t.expand(len(rows)), conditioning, settings, noise=noise,
                                     with_log_prob=False)
                value = meter.score(reward, policy.decode(step.x0_pred), rows)
                (gradient,) = torch.autograd.grad(value.sum(), x_t)
            meter.gradient(len(rows), settings, conditioning)
            x = step.prev_sample.detach() + config.scale * torch.nan_to_num(gradient)
    with torch.no_grad():
        images = policy.decode(x)
        return best_per_prompt(particles, x, images, meter.score(reward, images, rows), meter)
