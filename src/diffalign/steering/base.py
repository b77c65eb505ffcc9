"""What every test-time steering method shares: its result, the compute it spent, its particles' seeds.

A steering method spends two kinds of compute a comparison must match: denoiser passes and reward calls.
:class:`Meter` counts both where they happen (:meth:`Meter.denoise`, :meth:`Meter.score`,
:meth:`Meter.gradient`), so a method cannot report a cost it did not pay.

- ``denoiser_passes``: latent rows sent through the denoiser forward (a guided step on b latents is 2b rows,
  the unconditional and the conditional half);
- ``gradient_passes``: rows of those passes that were also backpropagated (gradient guidance, value gradients);
- ``reward_calls``: images scored by the reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffalign.models.policy import Policy
from diffalign.rollout import (
    Conditioning, StepSettings, denoise_step, derive_seed, encode, guided_output, initial_noise, is_guided,
    noise_generators, per_sample_noise, sample_seed,
)
from diffalign.samplers import DDIMStepOutput

#: Random stream of a steering run's selection and resampling draws (the particles' noise uses the sample seeds).
SELECTION_STREAM = 20
#: Random stream of the seeds of particles derived from one sample seed (:meth:`Particles.from_seeds`).
PARTICLE_STREAM = 21


@dataclass
class Meter:
    """Running counts of the compute a steering run spends."""

    denoiser_passes: int = 0
    gradient_passes: int = 0
    reward_calls: int = 0

    def denoise(self, policy: Policy, x_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                settings: StepSettings, **kwargs) -> DDIMStepOutput:
        """:func:`~diffalign.rollout.denoise_step`, counted."""
        self.denoiser_passes += x_t.shape[0] * (2 if is_guided(settings, conditioning) else 1)
        return denoise_step(policy, x_t, t, conditioning, settings, **kwargs)

    def output(self, policy: Policy, x_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
               settings: StepSettings) -> torch.Tensor:
        """:func:`~diffalign.rollout.guided_output`, counted (take the step with ``denoise_step(model_output=)``)."""
        self.denoiser_passes += x_t.shape[0] * (2 if is_guided(settings, conditioning) else 1)
        return guided_output(policy, x_t, t, conditioning, settings)

    def score(self, reward, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The reward ``[b]`` of ``images`` (a reward raises on NaN rather than returning it), counted."""
        self.reward_calls += images.shape[0]
        return reward(images, list(prompts)).float()

    def gradient(self, rows: int, settings: StepSettings, conditioning: Conditioning) -> None:
        """Counts a backward pass through the denoiser for ``rows`` latents."""
        self.gradient_passes += rows * (2 if is_guided(settings, conditioning) else 1)


@dataclass(frozen=True)
class SteeringResult:
    """One steered image per prompt and what it cost.

    ``images`` ``[n, 3, H, W]`` in [0, 1], ``latents`` ``[n, C, h, w]`` (x_0), ``rewards`` ``[n]`` (the steering
    reward of each returned image); the counts are totals over the n prompts (see the module docstring).
    """

    prompts: list[str]
    images: torch.Tensor
    latents: torch.Tensor
    rewards: torch.Tensor
    denoiser_passes: int
    gradient_passes: int
    reward_calls: int

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "rewards": self.rewards.tolist(), "denoiser_passes": self.denoiser_passes,
                "gradient_passes": self.gradient_passes, "reward_calls": self.reward_calls}


@dataclass(frozen=True)
class Particles:
    """k particles for each of n prompts, flattened prompt-major to n·k rows: particle j of prompt i is row
    i·k + j and uses the noise streams of sample seed ``sample_seed(seed, 0, i·k + j)``; with k = 1 the rows are
    exactly the samples :func:`~diffalign.rollout.sample` draws for the same prompts and seed."""

    prompts: list[str]
    k: int
    seeds: list[int]

    @classmethod
    def of(cls, prompts: Sequence[str], k: int, seed: int) -> Particles:
        if k < 1:
            raise ValueError(f"particles must be >= 1, got {k}")
        return cls(list(prompts), k, [sample_seed(seed, 0, i) for i in range(len(prompts) * k)])

    @classmethod
    def from_seeds(cls, prompts: Sequence[str], k: int, seeds: Sequence[int]) -> Particles:
        """k particles for each prompt seeded ``seeds[i]``: particle 0 uses that seed itself (so k = 1 is the plain
        sample of that seed), particle j > 0 a seed derived from it."""
        if k < 1:
            raise ValueError(f"particles must be >= 1, got {k}")
        return cls(list(prompts), k, [int(s) if j == 0 else derive_seed(int(s), 0, j, PARTICLE_STREAM)
                                      for s in seeds for j in range(k)])

    @property
    def rows(self) -> list[str]:
        """The prompt of every row."""
        return [p for p in self.prompts for _ in range(self.k)]

    @property
    def prompt_index(self) -> torch.Tensor:
        """The prompt index of every row ``[n·k]``."""
        return torch.arange(len(self.prompts)).repeat_interleave(self.k)

    def encode(self, policy: Policy, settings: StepSettings) -> tuple[Conditioning, Conditioning]:
        """The conditioning of the n prompts (each encoded once) and of the n·k rows (indexed from it)."""
        prompts = encode(policy, self.prompts, settings)
        return prompts, prompts[self.prompt_index]

    def step_generators(self) -> list[torch.Generator]:
        return [noise_generators(s)[1] for s in self.seeds]

    def selection_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seeds[0], 0, 0, SELECTION_STREAM))

    def grouped(self, values: torch.Tensor) -> torch.Tensor:
        """Row values ``[n·k, ...]`` → ``[n, k, ...]``."""
        return values.reshape(len(self.prompts), self.k, *values.shape[1:])


def best_per_prompt(particles: Particles, latents: torch.Tensor, images: torch.Tensor,
                    rewards: torch.Tensor, meter: Meter) -> SteeringResult:
    """The highest-reward particle of each prompt (ties: the first) as the result."""
    best = particles.grouped(rewards).argmax(dim=1)
    rows = torch.arange(len(particles.prompts)) * particles.k + best
    return SteeringResult(particles.prompts, images[rows], latents[rows], rewards[rows].detach(),
                          meter.denoiser_passes, meter.gradient_passes, meter.reward_calls)


def draw(log_weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices per row ``[n, count]`` drawn with replacement from the normalised weights of
    ``log_weights`` ``[n, k]`` (uniform for a row whose weights are all zero)."""
    usable = torch.isfinite(log_weights).any(dim=1, keepdim=True)
    probs = torch.softmax(torch.where(usable, log_weights, torch.zeros_like(log_weights)), dim=1)
    return torch.multinomial(probs, count, replacement=True, generator=generator)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / Σ ŵ² of the normalised weights, per row of ``log_weights`` ``[..., k]``."""
    normalised = torch.softmax(log_weights, dim=-1)
    return 1.0 / normalised.pow(2).sum(dim=-1)


@torch.no_grad()
def propagate(policy: Policy, particles: Particles, settings: StepSettings, meter: Meter,
              after_step=None) -> torch.Tensor:
    """Runs every particle through the sampler; returns x_0 ``[n·k, C, h, w]``.

    ``after_step(s, step, x)`` is called after step s (0-based) with the step's output (its ``x0_pred`` is x̂_0
    from the step's input) and the new latents x; it returns the latents to continue from (resampled ones).
    """
    rows, shape, device = particles.rows, policy.latent_shape, policy.device
    _, conditioning = particles.encode(policy, settings)
    generators = particles.step_generators()
    x = initial_noise(particles.seeds, shape, device)
    for s, t in enumerate(policy.schedule.timesteps(settings.num_inference_steps).to(device)):
        noise = per_sample_noise(generators, shape, device) if settings.eta > 0 else None
        step = meter.denoise(policy, x, t.expand(len(rows)), conditioning, settings, noise=noise,
                             with_log_prob=False)
        x = step.prev_sample if after_step is None else after_step(s, step, step.prev_sample)
    return x
