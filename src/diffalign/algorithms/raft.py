"""Reward-filtered fine-tuning: RAFT (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation
Model Alignment") and its partial variant P-GRAFT (fine-tuning only the high-noise part of the schedule).

Each epoch samples K images per prompt from the current model (``sample.samples_per_prompt``), keeps the best of
each prompt's group (``top_k``, optionally only those with reward ≥ ``threshold``) and fine-tunes on the kept
final latents x_0 with the ordinary denoising loss of the model's parameterisation:

    t ~ U{min_timestep, …, T−1},  ε ~ N(0, I),  x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε
    L = ‖f_θ(x_t, t, c) − target(x_0, ε, t)‖²           (target: ε, x_0 or v, samplers.diffusion_target)
        + β ‖f_θ(x_t, t, c) − f_base(x_t, t, c)‖²      (optional, ``base_mse_coef``: stay near the base model)

What it optimises: maximum likelihood on the reward-filtered samples of the current model, i.e. each round
moves the model toward p(x|c) restricted to its best samples — a reward-tilted target that stays implicitly
close to the current model (it can only reweight what the model already draws; best-of-K sharpening). With
``min_timestep`` > 0 (P-GRAFT, Sarkar et al. 2025, "Generalized Rejection sAmpling Fine-Tuning"), only noise
levels t ≥ min_timestep are trained, so the low-noise part of the chain keeps the base model's distribution.
``caption_dropout`` replaces the caption by the negative prompt's embedding on that fraction of rows, so the
unconditional model that classifier-free guidance needs is trained along.

Every epoch takes the same number of optimizer steps (``updates_per_epoch``), each on ``train.batch_size``
rows drawn with replacement from this process's kept samples, so processes never disagree on the number of
collective calls; an epoch in which a process kept nothing trains that process on zero-weighted rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from diffalign.algorithms.base import Algorithm, GeneratorFor, MethodConfig, Minibatching
from diffalign.models.policy import Policy
from diffalign.rollout import Conditioning, Rollout, StepSettings
from diffalign.samplers import diffusion_target, q_sample


@dataclass
class RaftConfig(MethodConfig):
    """RAFT / P-GRAFT settings."""

    top_k: int = 1
    """Samples kept per prompt group (the best by reward)."""
    threshold: float | None = None
    """Keep only samples whose reward is at least this (e.g. 1.0: every constraint of a verifiable reward met)."""
    updates_per_epoch: int = 4
    """Optimizer steps per epoch on the kept samples."""
    min_timestep: int = 0
    """Train only noise levels t >= this (P-GRAFT); 0 trains every level (RAFT)."""
    caption_dropout: float = 0.1
    """Fraction of rows trained with the negative prompt's embedding (keeps the unconditional model for CFG)."""
    base_mse_coef: float = 0.0
    """β of the MSE between the model's output and the base model's at the same noised input (0: none)."""

    def validate(self, settings: StepSettings | None = None) -> list[str]:
        errors = []
        if self.top_k < 1:
            errors.append(f"method.top_k must be >= 1, got {self.top_k}")
        if self.updates_per_epoch < 1:
            errors.append(f"method.updates_per_epoch must be >= 1, got {self.updates_per_epoch}")
        if self.min_timestep < 0:
            errors.append(f"method.min_timestep must be >= 0, got {self.min_timestep}")
        if not 0 <= self.caption_dropout < 1:
            errors.append(f"method.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.base_mse_coef < 0:
            errors.append(f"method.base_mse_coef must be >= 0, got {self.base_mse_coef}")
        if settings is not None and self.caption_dropout > 0 and settings.guidance_scale == 1.0:
            errors.append("method.caption_dropout needs the negative prompt's embedding, which sampling without "
                          "guidance (sample.guidance_scale = 1) does not compute; set method.caption_dropout 0")
        return errors


def select_best(rewards: torch.Tensor, prompts: Sequence[str], top_k: int,
                threshold: float | None = None) -> torch.Tensor:
    """A 0/1 mask ``[B]`` of the ``top_k`` highest rewards of each prompt's group (ties: the earlier sample),
    restricted to rewards ≥ ``threshold`` when given."""
    keep = torch.zeros(len(prompts))
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    for rows in groups.values():
        values = rewards[rows]
        order = sorted(range(len(rows)), key=lambda k: (-values[k].item(), k))[:top_k]
        for k in order:
            if threshold is None or values[k].item() >= threshold:
                keep[rows[k]] = 1.0
    return keep


@dataclass(frozen=True)
class DenoisingBatch:
    """b kept samples to train the denoising loss on: ``x0`` ``[b, C, h, w]``, their ``conditioning`` (after
    caption dropout), ``levels`` ``[b]`` uniform in [0, 1) (the noise level, mapped onto the trained timesteps by
    :func:`timesteps_of`), ``noise`` ``[b, C, h, w]`` and row ``weights`` ``[b]`` (0 for padding rows)."""

    x0: torch.Tensor
    conditioning: Conditioning
    levels: torch.Tensor
    noise: torch.Tensor
    weights: torch.Tensor


def timesteps_of(levels: torch.Tensor, min_timestep: int, num_train_timesteps: int) -> torch.Tensor:
    """Uniform ``levels`` in [0, 1) → integer timesteps uniform on {min_timestep, …, num_train_timesteps − 1}."""
    return min_timestep + (levels * (num_train_timesteps - min_timestep)).long().clamp(
        max=num_train_timesteps - min_timestep - 1)


class Raft(Algorithm):
    """Plain rollouts, a best-of-group selection as targets, and the denoising loss on the kept samples."""

    name = "raft"
    config_class = RaftConfig
    config: RaftConfig

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        return select_best(rewards, prompts, self.config.top_k, self.config.threshold)

    def minibatches(self, rollout: Rollout, targets: torch.Tensor, plan: Minibatching,
                    generator_for: GeneratorFor) -> Iterator[list[DenoisingBatch]]:
        kept = targets.cpu().nonzero().flatten()
        pool, weight = (kept, 1.0) if len(kept) else (torch.arange(len(rollout)), 0.0)
        generator = generator_for(0)
        for _ in range(self.config.updates_per_epoch):
            group = []
            for _ in range(plan.accumulation):
                rows = pool[torch.randint(len(pool), (plan.batch_size,), generator=generator)]
                x0 = rollout.latents[rows, -1]
                levels = torch.rand(len(rows), generator=generator)
                noise = torch.randn(x0.shape, generator=generator).to(x0.device)
                conditioning = rollout.conditioning[rows]
                if self.config.caption_dropout > 0:
                    drop = torch.rand(len(rows), generator=generator) < self.config.caption_dropout
                    embeds = torch.where(drop[:, None, None].to(x0.device), conditioning.negative_embeds,
                                         conditioning.prompt_embeds)
                    conditioning = Conditioning(embeds, conditioning.negative_embeds)
                group.append(DenoisingBatch(x0, conditioning, levels.to(x0.device), noise,
                                            torch.full((len(rows),), weight, device=x0.device)))
            yield group

    def loss(self, policy: Policy, batch: DenoisingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        schedule = policy.schedule
        if self.config.min_timestep >= schedule.num_train_timesteps:
            raise ValueError(f"method.min_timestep ({self.config.min_timestep}) must be below the model's "
                             f"{schedule.num_train_timesteps} training timesteps")
        t = timesteps_of(batch.levels, self.config.min_timestep, schedule.num_train_timesteps)
        x_t = q_sample(batch.x0, batch.noise, t, schedule.alphas_cumprod)
        output = policy.model_output(x_t, t, batch.conditioning.prompt_embeds).float()
        target = diffusion_target(batch.x0, batch.noise, t, schedule.alphas_cumprod, schedule.prediction_type)
        per_row = (output - target.float()).square().mean(dim=(1, 2, 3))
        loss = (batch.weights * per_row).mean()
        metrics = {"denoise/loss": per_row.detach().mean(), "denoise/kept_fraction": batch.weights.mean()}
        if self.config.base_mse_coef > 0:
            with torch.no_grad(), policy.reference():
                base = policy.model_output(x_t, t, batch.conditioning.prompt_embeds).float()
            to_base = (output - base).square().mean(dim=(1, 2, 3))
            loss = loss + self.config.base_mse_coef * (batch.weights * to_base).mean()
            metrics["denoise/mse_to_base"] = to_base.detach().mean()
        return loss, metrics
