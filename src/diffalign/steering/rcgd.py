"""Reward-directed conditional diffusion (RCGD; Yuan, Huang, Ni, Chen, Wang, NeurIPS 2023): sampling steered toward
a target reward y* by a reward model μ on the noisy latents (:mod:`diffalign.models.latent_reward`).

The reward-conditioned score is realised as classifier guidance with a Gaussian likelihood
p_t(y | x_t) ∝ exp(−G‖y − μ(x_t, t)‖²/2) (G = 1/σ², the guidance strength). Each step adds its gradient to the
noise prediction before the DDIM step (Dhariwal & Nichol 2021 eq. 14):

    ε̃ = ε̂(x_t) + √(1 − ᾱ_t) · G · ∇_{x_t} ½ ‖y* − μ(x_t, t)‖²

which pulls x̂_0 toward latents that μ scores y*. For x0- and v-prediction models the same shift is applied to
their output through :func:`~diffalign.samplers.shift_epsilon` (x̂_0 moves by −√(1−ᾱ_t)/√ᾱ_t · Δε, v by
Δε/√ᾱ_t), so the guided step is the same whatever the parameterisation.

Differences from the reference (``Kaffaljidhmah2/RCGDM``, ``sd_pipeline.py``):

- the gradient is taken per sample (of the sum of the per-sample losses). The reference differentiates
  ``MSELoss`` — a batch mean — so each sample's guidance is silently divided by the batch size (its README's
  G = 100 at ``--bs 4`` is G = 25 here);
- the sampler is this library's DDIM step (the reference's pipeline keeps SD 1.5's PNDM scheduler, whose
  comment says DDIM);
- μ is evaluated at the step's timestep when it was trained with timestep conditioning.

The result's ``rewards`` are μ's predictions on the final clean latents (t = 0); ``reward_calls`` counts μ
evaluations (one per sample and step, plus the final one); the denoiser is never backpropagated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffalign.models.latent_reward import LatentRewardModel
from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings, denoise_step, initial_noise, per_sample_noise
from diffalign.samplers import shift_epsilon
from diffalign.steering.base import Meter, Particles, SteeringResult


@dataclass
class RCGDConfig:
    """RCGD settings: the target reward and how hard to pull toward it."""

    target: float = 1.0
    """y*, the reward the samples should have (in the reward model's label units)."""
    guidance: float = 100.0
    """G = 1/σ² of the Gaussian likelihood: the strength of the pull (0: plain sampling)."""
    allow_extrapolation: bool = False
    """Allow a target outside the range of the reward model's training labels."""

    def validate(self, settings: StepSettings, reward_model: LatentRewardModel | None) -> list[str]:
        errors = []
        if not math.isfinite(self.target):
            errors.append(f"target must be a finite number, got {self.target}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            errors.append(f"guidance must be >= 0, got {self.guidance}")
        if reward_model is not None and math.isfinite(self.target) and not self.allow_extrapolation \
                and not reward_model.in_label_range(self.target):
            low, high = reward_model.config.label_min, reward_model.config.label_max
            errors.append(f"target {self.target:g} is outside the reward model's label range [{low:.4g}, {high:.4g}] "
                          "(the labels it was trained on); pass allow_extrapolation (--allow-extrapolation) to ask "
                          "for it anyway")
        return errors


def target_gradient(reward_model: LatentRewardModel, x_t: torch.Tensor, t: torch.Tensor,
                    target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """∇_{x_t} ½ (y* − μ(x_t, t))² per sample ``[b, C, h, w]`` and μ(x_t, t) ``[b]``.

    The gradient of the *sum* of the per-sample losses: sample i's gradient is its own loss's (no 1/b)."""
    with torch.enable_grad():
        x_t = x_t.detach().float().requires_grad_(True)
        predicted = reward_model(x_t, t)
        (gradient,) = torch.autograd.grad(0.5 * (target - predicted).pow(2).sum(), x_t)
    return gradient, predicted.detach()


@torch.no_grad()
def rcgd(policy: Policy, prompts: Sequence[str], reward: LatentRewardModel, settings: StepSettings,
         config: RCGDConfig, seed: int = 0) -> SteeringResult:
    """One RCGD-guided sample per prompt (see the module docstring); ``reward`` is the latent reward model μ."""
    reward.check_compatible(policy.latent_shape, policy.vae.config.scaling_factor)
    errors = config.validate(settings, reward)
    if errors:
        raise ValueError("rcgd: " + "; ".join(errors))
    particles, meter = Particles.of(prompts, 1, seed), Meter()
    rows, shape, device, schedule = particles.rows, policy.latent_shape, policy.device, policy.schedule
    _, conditioning = particles.encode(policy, settings)
    generators = particles.step_generators()
    reward = reward.to(device)
    x = initial_noise(particles.seeds, shape, device)
    for t in schedule.timesteps(settings.num_inference_steps).to(device):
        t_batch = t.expand(len(rows))
        noise = per_sample_noise(generators, shape, device) if settings.eta > 0 else None
        output = meter.output(policy, x, t_batch, conditioning, settings)
        if config.guidance > 0:
            gradient, _ = target_gradient(reward, x, t_batch, config.target)
            meter.reward_calls += len(rows)
            noise_level = (1 - schedule.alphas_cumprod.to(device)[t].float()).sqrt()
            output = shift_epsilon(output, noise_level * config.guidance * gradient, t_batch,
                                   schedule.alphas_cumprod, schedule.prediction_type)
        x = denoise_step(policy, x, t_batch, conditioning, settings, noise=noise, with_log_prob=False,
                         model_output=output).prev_sample
    predicted = reward(x, torch.zeros(len(rows), dtype=torch.long, device=device))
    meter.reward_calls += len(rows)
    return SteeringResult(particles.prompts, policy.decode(x), x, predicted.float().cpu(), meter.denoiser_passes,
                          meter.gradient_passes, meter.reward_calls)
