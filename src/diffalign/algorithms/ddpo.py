"""DDPO: denoising diffusion policy optimisation with the PPO-clip surrogate (Black et al. 2023, DDPO_IS).

Each denoising step is an action; a sample's advantage (its normalised final reward) is shared by all its
steps, with no discounting and no value function. The loss, per transition (spec/ddpo_sdpo.md §1.4):

    A = clip(A, −A_max, A_max),   r = exp(log π_θ(x_{t−1}|x_t) − log π_old(x_{t−1}|x_t))
    L = mean_b max(−A r, −A clip(r, 1 − ε, 1 + ε))

Differences from kvablack/ddpo-pytorch: log-probs are recomputed in fp32 (the reference uses the inference
dtype), so the ratio is exactly 1 before the first update; ``approx_kl`` is Schulman's k3 estimator
(r − 1) − log r, the estimator the reference's own comment recommends, next to the reference's
½(Δ log p)² as ``policy/approx_kl_sq``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings, Transitions, transition_log_prob


@dataclass
class DDPOConfig:
    """DDPO's method settings (defaults from ddpo-pytorch ``config/base.py``)."""

    clip_range: float = 1e-4
    """PPO clip range ε on the per-step likelihood ratio (a per-pixel bound with mean log-probs)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [−adv_clip_max, adv_clip_max]."""

    def validate(self) -> list[str]:
        errors = []
        if self.clip_range <= 0:
            errors.append(f"ddpo.clip_range must be > 0, got {self.clip_range}")
        if self.adv_clip_max <= 0:
            errors.append(f"ddpo.adv_clip_max must be > 0, got {self.adv_clip_max}")
        return errors


def ppo_clip_loss(
    log_prob: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor, clip_range: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO-clip surrogate over ``[b]`` transitions and its diagnostics (namespaced metric keys)."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - log_prob_old
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "policy/loss": loss.detach(),
            "policy/approx_kl": ((ratio - 1) - log_ratio).mean(),
            "policy/approx_kl_sq": 0.5 * (log_ratio**2).mean(),
            "policy/clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
            "policy/ratio_mean": ratio.mean(),
        }
    return loss, metrics


class DDPO:
    """DDPO collects plain rollouts (the loop's default) and trains with :func:`ppo_clip_loss`."""

    name = "ddpo"

    def __init__(self, config: DDPOConfig):
        self.config = config

    def loss(
        self, policy: Policy, batch: Transitions, settings: StepSettings, guidance: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The surrogate for one minibatch of transitions, re-scored under the current policy."""
        step = transition_log_prob(policy, batch, settings, guidance)
        return ppo_clip_loss(
            step.log_prob, batch.log_prob_old, batch.advantages, self.config.clip_range, self.config.adv_clip_max
        )
