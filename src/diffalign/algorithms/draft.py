"""Reward backpropagation through the sampler: DRaFT-K, DRaFT-LV (Clark et al. 2024, "Directly Fine-Tuning
Diffusion Models on Differentiable Rewards") and AlignProp's randomised truncation (Prabhudesai et al. 2023).

The policy's samples are drawn as usual; training then re-runs the last K denoising steps of each sample from
its stored x_{t_K} (detached) with fresh step noise and gradients on, decodes x_0 and ascends the reward:

    x_{t_{j+1}} = μ_θ(x_{t_j}, t_j) + σ_j z_j   for the last K steps (z_j fixed noise; DDIM eq. 12 and 16)
    L = −mean_b r(decode(x_0), c)

Earlier steps are detached (DRaFT-K: truncated backpropagation; K = 1 is DRaFT-1). DRaFT-LV draws
``lv_samples`` noises for the last step of the same x_{t_1} and averages their rewards (a lower-variance
gradient for K = 1). With ``randomized_truncation`` each optimizer step draws K uniformly from 1…``truncation``
(AlignProp). ``checkpointing`` recomputes each step's activations in the backward pass
(``torch.utils.checkpoint``), so memory grows with K only by one latent per step.

The reward must be differentiable (checked when the method is built, before anything runs). Because the reward
is maximised directly, a learned proxy is easy to over-optimise: log a gold reward beside it (``reward.gold``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from diffalign.algorithms.base import Algorithm, GeneratorFor, MethodConfig, Minibatching
from diffalign.models.policy import Policy
from diffalign.rollout import Conditioning, Rollout, StepSettings, denoise_step


@dataclass
class DraftConfig(MethodConfig):
    """DRaFT / AlignProp settings."""

    truncation: int = 1
    """K: the last K denoising steps get gradients (earlier ones are detached)."""
    randomized_truncation: bool = False
    """AlignProp: each optimizer step draws K uniformly from 1..truncation."""
    lv_samples: int = 1
    """DRaFT-LV: noise draws of the last step averaged per sample (needs truncation 1)."""
    checkpointing: bool = True
    """Recompute each step's activations during the backward pass (memory grows with K by one latent per step)."""

    @property
    def needs_differentiable_reward(self) -> bool:
        return True

    def validate(self, settings: StepSettings | None = None) -> list[str]:
        errors = []
        if self.truncation < 1:
            errors.append(f"method.truncation must be >= 1, got {self.truncation}")
        if self.lv_samples < 1:
            errors.append(f"method.lv_samples must be >= 1, got {self.lv_samples}")
        if self.lv_samples > 1 and (self.truncation != 1 or self.randomized_truncation):
            errors.append(f"method.lv_samples > 1 (DRaFT-LV) needs method.truncation 1 without randomized "
                          f"truncation, got truncation {self.truncation}")
        if settings is not None and self.truncation > settings.num_inference_steps:
            errors.append(f"method.truncation ({self.truncation}) must be <= sample.num_inference_steps "
                          f"({settings.num_inference_steps})")
        return errors


@dataclass(frozen=True)
class TruncatedChains:
    """The last ``len(noises)`` steps of b samples: ``x_start`` ``[b, C, h, w]`` (x at the first trained step,
    detached), ``timesteps`` ``[K]``, the step ``noises`` ``[K, n·b, C, h, w]`` (n = lv_samples; earlier steps use
    the first b), ``conditioning`` and ``prompts`` of the b samples."""

    x_start: torch.Tensor
    timesteps: torch.Tensor
    noises: torch.Tensor
    conditioning: Conditioning
    prompts: list[str]


def _step(policy: Policy, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning, settings: StepSettings,
          noise: torch.Tensor) -> torch.Tensor:
    """x_{t-1} = μ_θ(x_t) + σ_t z with the gradient through μ (the step's own ``prev_sample`` is detached)."""
    step = denoise_step(policy, x, t.expand(x.shape[0]), conditioning, settings, noise=noise, with_log_prob=False)
    return step.mean + step.std * noise


class Draft(Algorithm):
    """Plain rollouts; each micro-batch re-runs its samples' last K steps with gradients and ascends the reward."""

    name = "draft"
    config_class = DraftConfig
    config: DraftConfig

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        return rewards  # logged only: the gradient comes from the reward itself

    def minibatches(self, rollout: Rollout, targets: torch.Tensor, plan: Minibatching,
                    generator_for: GeneratorFor) -> Iterator[list[TruncatedChains]]:
        generator = generator_for(0)
        order = torch.randperm(len(rollout), generator=generator)
        per_step = plan.batch_size * plan.accumulation
        n = self.config.lv_samples
        for first in range(0, len(rollout), per_step):
            k = (int(torch.randint(1, self.config.truncation + 1, (1,), generator=generator))
                 if self.config.randomized_truncation else self.config.truncation)
            group = []
            for start in range(first, min(first + per_step, len(rollout)), plan.batch_size):
                rows = order[start : start + plan.batch_size]
                x = rollout.latents[rows, rollout.num_steps - k]
                noises = torch.randn((k, n * len(rows), *x.shape[1:]), generator=generator).to(x.device)
                group.append(TruncatedChains(x, rollout.timesteps[0, rollout.num_steps - k :], noises,
                                             rollout.conditioning[rows], [rollout.prompts[i] for i in rows.tolist()]))
            yield group

    def loss(self, policy: Policy, batch: TruncatedChains) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, n, k = batch.x_start.shape[0], self.config.lv_samples, len(batch.timesteps)
        x, conditioning = batch.x_start, batch.conditioning
        for j, t in enumerate(batch.timesteps):
            if j == k - 1 and n > 1:  # DRaFT-LV: n draws of the last step from the same x
                x = x.repeat(n, 1, 1, 1)
                conditioning = Conditioning(conditioning.prompt_embeds.repeat(n, 1, 1),
                                            None if conditioning.negative_embeds is None
                                            else conditioning.negative_embeds.repeat(n, 1, 1))
            noise = batch.noises[j, : x.shape[0]]
            if self.config.checkpointing and torch.is_grad_enabled():
                x = checkpoint(_step, policy, x, t, conditioning, self.settings, noise, use_reentrant=False)
            else:
                x = _step(policy, x, t, conditioning, self.settings, noise)
        images = policy.decode(x)
        rewards = self.reward(images, batch.prompts * (n if n > 1 else 1))
        loss = -rewards.mean()
        return loss, {"draft/reward": rewards.detach().mean(), "draft/truncation": torch.tensor(float(k)),
                      "policy/loss": loss.detach()}
