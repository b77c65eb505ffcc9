"""Rollouts: sampling trajectories from a Policy with their per-step log-probs.

A :class:`Rollout` records everything the algorithms need. Each sample draws its noise from its own generator,
seeded from (run seed, epoch, sample index) by :func:`sample_seed`, so a sample is the same whatever batch it
was drawn in and can be regenerated alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from diffalign.models.policy import Policy
from diffalign.samplers import ddim_step, previous_timestep
from diffalign.samplers.ddim import Reduction


@dataclass
class Rollout:
    """A batch of B trajectories of T denoising steps over latents of shape (C, h, w).

    - ``prompts``: B strings; ``prompt_embeds`` ``[B, L, D]``; ``negative_embeds`` ``[B, L, D]`` when sampled
      with guidance; ``seeds`` ``[B]`` (int64, see :func:`sample_seed`)
    - ``latents`` ``[B, T+1, C, h, w]``: x_T, …, x_0 (``latents[:, j]`` is the input of step j)
    - ``timesteps`` ``[B, T]`` (int64): the t of step j
    - ``log_probs`` ``[B, T]``: log π(x_{t-1} | x_t) of each step, reduced over pixels as ``reduction`` says
    - ``means`` ``[B, T, C, h, w]`` (optional): μ_θ of each step; ``x0_preds`` ``[B, T, C, h, w]`` (optional)
    - ``images`` ``[B, 3, H, W]`` in [0, 1], decoded from x_0; ``rewards`` ``[B]`` once scored
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    seeds: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor
    means: torch.Tensor | None = None
    x0_preds: torch.Tensor | None = None
    rewards: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def index(self, rows: torch.Tensor | slice) -> Rollout:
        """The sub-batch at ``rows`` (tensor fields indexed along dim 0)."""
        rows_list = range(len(self))[rows] if isinstance(rows, slice) else rows.tolist()
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                values[field.name] = value[rows]
            elif isinstance(value, list):
                values[field.name] = [value[i] for i in rows_list]
        return replace(self, **values)

    @staticmethod
    def cat(rollouts: Sequence[Rollout]) -> Rollout:
        """Concatenates rollouts along the batch dimension."""
        values = {}
        for field in fields(Rollout):
            parts = [getattr(r, field.name) for r in rollouts]
            if parts[0] is None:
                values[field.name] = None
            elif isinstance(parts[0], list):
                values[field.name] = [p for part in parts for p in part]
            else:
                values[field.name] = torch.cat(parts)
        return Rollout(**values)


def derive_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed for item ``index`` of ``epoch`` in random stream ``stream`` of a run seeded ``seed``.

    Streams keep independent uses apart (0: sample noise, see :data:`NOISE_STREAM`; the training loop uses
    others for prompts and shuffles). numpy's SeedSequence does the mixing.
    """
    state = np.random.SeedSequence([seed, epoch, index, stream]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


NOISE_STREAM = 0


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The noise seed of sample ``index`` (its index in the whole epoch, across processes) of ``epoch``."""
    return derive_seed(seed, epoch, index, NOISE_STREAM)


@dataclass(frozen=True)
class StepSettings:
    """How trajectories are sampled (and their transitions re-scored): steps, guidance, stochasticity.

    ``guidance_scale`` w applies classifier-free guidance with the embedding of ``negative_prompt``; ``eta``
    scales the DDIM noise (1 = DDPM posterior variance; 0 = deterministic, no log-probs); ``reduction`` is how
    log-probs are reduced over pixels.
    """

    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 1.0
    reduction: Reduction = "mean"
    negative_prompt: str = ""


@dataclass
class Transitions:
    """One denoising step of b trajectories (possibly a different step each): x_t → x_{t-1}.

    ``x_t``, ``x_prev`` ``[b, C, h, w]``; ``t`` ``[b]``; ``log_prob_old`` ``[b]`` (at sampling time);
    ``prompt_embeds`` / ``negative_embeds`` ``[b, L, D]``; ``advantages`` ``[b]``; ``step_index`` ``[b]`` (j).
    """

    x_t: torch.Tensor
    x_prev: torch.Tensor
    t: torch.Tensor
    log_prob_old: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    advantages: torch.Tensor
    step_index: torch.Tensor


def transitions(rollout: Rollout, rows: torch.Tensor, steps: torch.Tensor, advantages: torch.Tensor) -> Transitions:
    """The transitions of trajectories ``rows`` ``[b]`` at their step indices ``steps`` ``[b]``."""
    return Transitions(
        x_t=rollout.latents[rows, steps],
        x_prev=rollout.latents[rows, steps + 1],
        t=rollout.timesteps[rows, steps],
        log_prob_old=rollout.log_probs[rows, steps],
        prompt_embeds=rollout.prompt_embeds[rows],
        negative_embeds=None if rollout.negative_embeds is None else rollout.negative_embeds[rows],
        advantages=advantages[rows],
        step_index=steps,
    )


def _step(policy: Policy, x_t, t, prompt_embeds, negative_embeds, settings: StepSettings, guidance: bool, **kw):
    """Runs the denoiser on (x_t, t) and takes the DDIM step; shared by sampling and re-scoring."""
    schedule = policy.schedule
    scale = settings.guidance_scale if guidance else 1.0
    output = policy.model_output(x_t, t, prompt_embeds, negative_embeds if guidance else None, scale)
    return ddim_step(
        output,
        x_t,
        t,
        previous_timestep(t, schedule.num_train_timesteps, settings.num_inference_steps),
        schedule.alphas_cumprod,
        eta=settings.eta,
        final_alpha_cumprod=schedule.final_alpha_cumprod,
        prediction_type=schedule.prediction_type,
        reduction=settings.reduction,
        clip_sample_range=schedule.clip_sample_range,
        **kw,
    )


def transition_log_prob(policy: Policy, batch: Transitions, settings: StepSettings, guidance: bool = True):
    """Re-scores observed transitions under the current policy: the same DDIM step as sampling, given x_{t-1}.

    Returns the :class:`~diffalign.samplers.DDIMStepOutput` (``log_prob`` ``[b]`` carries the gradient).
    ``guidance=False`` scores with the conditional model alone (DDPO's ``train.cfg = False``).
    """
    guidance = guidance and batch.negative_embeds is not None
    return _step(policy, batch.x_t, batch.t, batch.prompt_embeds, batch.negative_embeds, settings, guidance,
                 prev_sample=batch.x_prev)


def _per_sample_noise(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


@torch.no_grad()
def sample(
    policy: Policy,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: StepSettings,
    *,
    record_means: bool = False,
    record_x0_preds: bool = False,
) -> Rollout:
    """Samples one trajectory per prompt, drawing sample i's noise from a generator seeded ``seeds[i]``.

    Noise is drawn on the CPU in fp32 and moved to the device, so a seed gives the same trajectory on any
    device and at any batch size. ``eta = 0`` gives deterministic DDIM with log-probs of zero.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: got {len(prompts)} prompts but {len(seeds)} seeds")
    device, n = policy.device, len(prompts)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    prompt_embeds = policy.encode_prompts(prompts)
    guidance = settings.guidance_scale != 1.0
    negative_embeds = policy.encode_prompts([settings.negative_prompt] * n) if guidance else None
    timesteps = policy.schedule.timesteps(settings.num_inference_steps).to(device)

    x = _per_sample_noise(generators, policy.latent_shape, device)
    latents, log_probs, means, x0_preds = [x], [], [], []
    for t in timesteps:
        noise = _per_sample_noise(generators, policy.latent_shape, device) if settings.eta > 0 else None
        step = _step(policy, x, t.expand(n), prompt_embeds, negative_embeds, settings, guidance,
                     noise=noise, with_log_prob=settings.eta > 0)
        x = step.prev_sample
        latents.append(x)
        log_probs.append(step.log_prob if step.log_prob is not None else torch.zeros(n, device=device))
        if record_means:
            means.append(step.mean)
        if record_x0_preds:
            x0_preds.append(step.x0_pred)

    return Rollout(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        seeds=torch.tensor([int(s) for s in seeds], dtype=torch.int64),
        latents=torch.stack(latents, dim=1),
        timesteps=timesteps.expand(n, -1).clone(),
        log_probs=torch.stack(log_probs, dim=1),
        images=policy.decode(x),
        means=torch.stack(means, dim=1) if record_means else None,
        x0_preds=torch.stack(x0_preds, dim=1) if record_x0_preds else None,
    )
