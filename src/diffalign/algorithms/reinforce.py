"""REINFORCE: the score-function policy gradient over the denoising chain (Black et al. 2023, DDPO_SF).

Per transition, with the sample's normalised advantage A shared by all its steps:

    L = mean_b [ −clip(A, ±A_max) · log π_θ(x_{t−1}|x_t) + β · KL(π_θ(·|x_t) ‖ π_base(·|x_t)) ]

The KL term (optional, ``kl_coef`` = β) is the closed form between the two Gaussian steps, which share σ_t:
‖μ_θ − μ_base‖² / 2σ_t², reduced over pixels like the log-prob, with μ_base from the same UNet with its LoRA
disabled (spec/ddpo_sdpo.md §2.4). There is no importance ratio: later micro-batches of an epoch are slightly
off-policy and nothing corrects for it (as in the reference).

Where this differs from the multi-algorithm seed (spec/ddpo_sdpo.md §2.3): its "entropy bonus" −c·H̃ with
H̃ = −log π_θ(x_{t−1}|x_t) is not an entropy — the DDIM step's σ_t is fixed by the schedule and η, so the true
entropy ½ log(2πe σ_t²) per dimension is constant in θ and its gradient is zero; the seed's term only shifts the
advantages by a constant. We regularise with the KL to the base model instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from diffalign.algorithms.advantages import AdvantageConfig, RewardNormaliser
from diffalign.algorithms.base import Algorithm, MethodConfig, shuffled_transitions
from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings, Transitions, kl_to_reference, transition_log_prob


@dataclass
class ReinforceConfig(MethodConfig):
    """REINFORCE's method settings."""

    adv_clip_max: float = 5.0
    """Advantages are clipped to [−adv_clip_max, adv_clip_max]."""
    kl_coef: float = 0.0
    """β of the KL-to-base penalty (0: none; > 0 costs one more denoiser pass per trained transition)."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on (a random subset per sample), in (0, 1]."""
    cfg: bool = True
    """Use classifier-free guidance when re-scoring transitions (as when sampling)."""
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)

    def validate(self, settings: StepSettings | None = None) -> list[str]:
        errors = []
        if self.adv_clip_max <= 0:
            errors.append(f"method.adv_clip_max must be > 0, got {self.adv_clip_max}")
        if self.kl_coef < 0:
            errors.append(f"method.kl_coef must be >= 0, got {self.kl_coef}")
        if not 0 < self.timestep_fraction <= 1:
            errors.append(f"method.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if settings is not None and settings.eta <= 0:
            errors.append(f"sample.eta must be > 0 for reinforce (its log-probs need a stochastic sampler), "
                          f"got {settings.eta}")
        return errors + self.advantages.validate("method.advantages")


def reinforce_loss(log_prob: torch.Tensor, advantages: torch.Tensor, adv_clip_max: float,
                   kl: torch.Tensor | None = None, kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """mean_b(−clip(A) · log π + β · KL) over ``[b]`` transitions, and its diagnostics."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    loss = -(advantages * log_prob).mean()
    metrics = {"policy/log_prob_mean": log_prob.detach().mean()}
    if kl is not None:
        loss = loss + kl_coef * kl.mean()
        metrics["kl/to_base_step"] = kl.detach().mean()
    metrics["policy/loss"] = loss.detach()
    return loss, metrics


class Reinforce(Algorithm):
    """Plain rollouts, DDPO's minibatches (one pass), and :func:`reinforce_loss`."""

    name = "reinforce"
    trains_on_transitions = True
    config_class = ReinforceConfig
    config: ReinforceConfig

    def __init__(self, config: ReinforceConfig, settings: StepSettings, reward=None):
        super().__init__(config, settings, reward)
        self.normaliser = RewardNormaliser(config.advantages)

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        return self.normaliser(rewards, prompts, generator)

    def minibatches(self, rollout, targets, plan, generator_for):
        return shuffled_transitions(rollout, targets, plan, generator_for, 1, self.config.timestep_fraction)

    def loss(self, policy: Policy, batch: Transitions) -> tuple[torch.Tensor, dict]:
        step = transition_log_prob(policy, batch, self.settings, self.config.cfg)
        kl = (kl_to_reference(policy, batch, step, self.settings, self.config.cfg) if self.config.kl_coef > 0
              else None)
        return reinforce_loss(step.log_prob, batch.advantages, self.config.adv_clip_max, kl, self.config.kl_coef)

    def state_dict(self) -> dict:
        return self.normaliser.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.normaliser.load_state_dict(state)
