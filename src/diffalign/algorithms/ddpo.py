"""DDPO: denoising diffusion policy optimisation with the PPO-clip surrogate (Black et al. 2023, DDPO_IS).

Each denoising step is an action; a sample's advantage (its normalised final reward) is shared by all its
steps, with no discounting and no value function. The loss, per transition (spec/ddpo_sdpo.md §1.4):

    A = clip(A, −A_max, A_max),   r = exp(log π_θ(x_{t−1}|x_t) − log π_old(x_{t−1}|x_t))
    L = mean_b max(−A r, −A clip(r, 1 − ε, 1 + ε))

Minibatches follow ddpo-pytorch (:func:`~diffalign.algorithms.base.shuffled_transitions`): per inner epoch the
samples are shuffled and each sample trains on a random subset of ``timestep_fraction`` of its steps; an optimizer
step accumulates ``accumulation`` row-minibatches × every trained step.

Differences from kvablack/ddpo-pytorch: log-probs are recomputed in fp32 (the reference uses the inference
dtype), so the ratio is exactly 1 before the first update; ``approx_kl`` is Schulman's k3 estimator
(r − 1) − log r, the estimator the reference's own comment recommends, next to the reference's
½(Δ log p)² as ``policy/approx_kl_sq``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from diffalign.algorithms.advantages import AdvantageConfig, RewardNormaliser
from diffalign.algorithms.base import Algorithm, MethodConfig, shuffled_transitions
from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings, Transitions, transition_log_prob
from diffalign.samplers import epsilon_equivalent_weight


@dataclass
class DDPOConfig(MethodConfig):
    """DDPO's method settings (defaults from ddpo-pytorch ``config/base.py``)."""

    clip_range: float = 1e-4
    """PPO clip range ε on the per-step likelihood ratio (a per-pixel bound with mean log-probs)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [−adv_clip_max, adv_clip_max]."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on (a random subset per sample), in (0, 1]."""
    cfg: bool = True
    """Use classifier-free guidance when re-scoring transitions (as when sampling)."""
    min_timestep: int = 0
    """Train only on steps whose t >= this (0: every step, as the reference). The last steps add noise no reward
    can see, and with x0-prediction they carry almost all of the gradient."""
    step_weighting: Literal["none", "epsilon"] = "none"
    """Weight each transition's loss by |∂μ/∂ε̂| / |∂μ/∂output| at its t (normalised to mean 1 over the sampled
    timesteps), so an x0- or v-prediction model's steps weigh as an ε-prediction model's ("none": as the reference)."""
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)

    def validate(self, settings: StepSettings | None = None) -> list[str]:
        errors = []
        if self.min_timestep < 0:
            errors.append(f"method.min_timestep must be >= 0, got {self.min_timestep}")
        if self.clip_range <= 0:
            errors.append(f"method.clip_range must be > 0, got {self.clip_range}")
        if self.adv_clip_max <= 0:
            errors.append(f"method.adv_clip_max must be > 0, got {self.adv_clip_max}")
        if self.num_inner_epochs < 1:
            errors.append(f"method.num_inner_epochs must be >= 1, got {self.num_inner_epochs}")
        if not 0 < self.timestep_fraction <= 1:
            errors.append(f"method.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if settings is not None and settings.eta <= 0:
            errors.append(f"sample.eta must be > 0 for ddpo (its log-probs need a stochastic sampler), "
                          f"got {settings.eta}")
        return errors + self.advantages.validate("method.advantages")


def ppo_clip_loss(
    log_prob: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor, clip_range: float,
    adv_clip_max: float, weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO-clip surrogate over ``[b]`` transitions (each term times ``weights`` ``[b]`` when given) and its
    diagnostics (namespaced metric keys)."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - log_prob_old
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    terms = torch.maximum(unclipped, clipped)
    loss = (terms if weights is None else weights * terms).mean()
    with torch.no_grad():
        metrics = {
            "policy/loss": loss.detach(),
            "policy/approx_kl": ((ratio - 1) - log_ratio).mean(),
            "policy/approx_kl_sq": 0.5 * (log_ratio**2).mean(),
            "policy/clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
            "policy/ratio_mean": ratio.mean(),
            "policy/ratio_max_dev": (ratio - 1).abs().max(),
        }
    return loss, metrics


class DDPO(Algorithm):
    """DDPO collects plain rollouts (the default) and trains with :func:`ppo_clip_loss`."""

    name = "ddpo"
    trains_on_transitions = True
    config_class = DDPOConfig
    config: DDPOConfig

    def __init__(self, config: DDPOConfig, settings: StepSettings, reward=None):
        super().__init__(config, settings, reward)
        self.normaliser = RewardNormaliser(config.advantages)

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        return self.normaliser(rewards, prompts, generator)

    def minibatches(self, rollout, targets, plan, generator_for):
        return shuffled_transitions(rollout, targets, plan, generator_for, self.config.num_inner_epochs,
                                    self.config.timestep_fraction, self.config.min_timestep)

    def step_weights(self, policy: Policy, t: torch.Tensor) -> torch.Tensor | None:
        """The ε-equivalent weights of timesteps ``t`` ``[b]``, normalised to mean 1 over the sampled timesteps."""
        if self.config.step_weighting == "none":
            return None
        schedule = policy.schedule
        every = schedule.timesteps(self.settings.num_inference_steps).to(t.device)
        scale = epsilon_equivalent_weight(every, schedule.alphas_cumprod, schedule.prediction_type).mean()
        return epsilon_equivalent_weight(t, schedule.alphas_cumprod, schedule.prediction_type) / scale

    def loss(self, policy: Policy, batch: Transitions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The surrogate for one micro-batch of transitions, re-scored under the current policy."""
        step = transition_log_prob(policy, batch, self.settings, self.config.cfg)
        return ppo_clip_loss(step.log_prob, batch.log_prob_old, batch.advantages, self.config.clip_range,
                             self.config.adv_clip_max, self.step_weights(policy, batch.t))

    def state_dict(self) -> dict:
        return self.normaliser.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.normaliser.load_state_dict(state)
