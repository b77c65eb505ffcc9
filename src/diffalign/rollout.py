"""Rollouts: the public denoising step and trajectories sampled from a Policy with their per-step log-probs.

:func:`denoise_step` is the one transition every method uses: it runs the (guided) denoiser and takes the DDIM
step, drawing x_{t-1} from given noise or scoring an observed one. :func:`sample` chains it into trajectories
and returns a frozen :class:`Rollout`.

Randomness is named: sample i's seed (:func:`sample_seed`, from run seed, epoch and index) seeds two independent
streams, one for x_T and one for the per-step noise (:func:`noise_generators`). A sample is therefore the same
whatever batch it was drawn in, can be regenerated alone, and two samples can share x_T while their step noise
differs (pass ``x_T=``: SDPO's pairs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from diffalign.models.policy import Policy
from diffalign.samplers import DDIMStepOutput, ddim_step, gaussian_kl, previous_timestep
from diffalign.samplers.ddim import Reduction


def derive_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed for item ``index`` of ``epoch`` in random stream ``stream`` of a run seeded ``seed``.

    Streams keep independent uses apart (0: sample seeds, see :data:`NOISE_STREAM`; the training loop uses
    others for prompts and shuffles). numpy's SeedSequence does the mixing.
    """
    state = np.random.SeedSequence([seed, epoch, index, stream]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


NOISE_STREAM = 0
#: The two streams a sample seed splits into: x_T and the per-step noise.
X_T_STREAM, STEP_NOISE_STREAM = 0, 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The noise seed of sample ``index`` (its index in the whole epoch, across processes) of ``epoch``."""
    return derive_seed(seed, epoch, index, NOISE_STREAM)


def noise_generators(sample_seed_: int) -> tuple[torch.Generator, torch.Generator]:
    """The (x_T, per-step noise) generators of one sample: two independent streams of its seed."""
    return tuple(torch.Generator().manual_seed(derive_seed(int(sample_seed_), 0, 0, stream))
                 for stream in (X_T_STREAM, STEP_NOISE_STREAM))


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device=None) -> torch.Tensor:
    """x_T ``[B, *shape]`` of the samples seeded ``seeds`` (drawn on the CPU in fp32, then moved)."""
    return per_sample_noise([noise_generators(s)[0] for s in seeds], shape, device)


@dataclass(frozen=True)
class StepSettings:
    """How trajectories are sampled (and their transitions re-scored): steps, guidance, stochasticity.

    ``guidance_scale`` w applies classifier-free guidance with the embedding of ``negative_prompt`` (1 = none);
    ``eta`` scales the DDIM noise (1 = DDPM posterior variance; 0 = deterministic, no log-probs); ``reduction``
    is how log-probs are reduced over pixels.
    """

    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 1.0
    reduction: Reduction = "mean"
    negative_prompt: str = ""

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def without_guidance(self) -> StepSettings:
        """The same settings with the conditional model alone (guidance scale 1)."""
        return dataclasses.replace(self, guidance_scale=1.0)


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of b samples: ``prompt_embeds`` ``[b, L, D]`` and, for guidance, ``negative_embeds``."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None = None

    def __getitem__(self, rows) -> Conditioning:
        negative = None if self.negative_embeds is None else self.negative_embeds[rows]
        return Conditioning(self.prompt_embeds[rows], negative)


def encode(policy: Policy, prompts: Sequence[str], settings: StepSettings) -> Conditioning:
    """The conditioning of ``prompts`` (with the negative prompt's embedding when ``settings`` guide: encoded once
    and shared by every row, a broadcast view)."""
    negative = None
    if settings.guided:
        negative = policy.encode_prompts([settings.negative_prompt]).expand(len(prompts), -1, -1)
    return Conditioning(policy.encode_prompts(prompts), negative)


def is_guided(settings: StepSettings, conditioning: Conditioning) -> bool:
    """Whether a step runs classifier-free guidance: the settings guide and the conditioning has negative
    embeddings (then each latent costs two denoiser rows, [uncond; cond])."""
    return settings.guided and conditioning.negative_embeds is not None


def guided_output(policy: Policy, x_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning,
                  settings: StepSettings) -> torch.Tensor:
    """The denoiser output at x_t ``[b, C, h, w]``, t ``[b]``, with classifier-free guidance when
    :func:`is_guided`."""
    guided = is_guided(settings, conditioning)
    return policy.model_output(x_t, t, conditioning.prompt_embeds, conditioning.negative_embeds if guided else None,
                               settings.guidance_scale if guided else 1.0)


def denoise_step(
    policy: Policy,
    x_t: torch.Tensor,
    t: torch.Tensor,
    conditioning: Conditioning,
    settings: StepSettings,
    *,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    with_log_prob: bool | None = None,
    model_output: torch.Tensor | None = None,
) -> DDIMStepOutput:
    """One denoising transition x_t ``[b, C, h, w]`` → x_{t-1} at per-sample timesteps ``t`` ``[b]``.

    Runs the denoiser (with classifier-free guidance when ``settings`` guide and the conditioning has negative
    embeddings) and takes the DDIM step: pass ``noise`` to draw x_{t-1}, or ``prev_sample`` to score an observed
    one (the log-prob then carries the gradient). The log-prob is computed whenever η > 0 unless
    ``with_log_prob=False``. ``model_output`` (from :func:`guided_output`) skips the denoiser.
    """
    schedule = policy.schedule
    output = guided_output(policy, x_t, t, conditioning, settings) if model_output is None else model_output
    return ddim_step(
        output, x_t, t, previous_timestep(t, schedule.num_train_timesteps, settings.num_inference_steps),
        schedule.alphas_cumprod, eta=settings.eta, final_alpha_cumprod=schedule.final_alpha_cumprod,
        prediction_type=schedule.prediction_type, reduction=settings.reduction,
        clip_sample_range=schedule.clip_sample_range, noise=noise, prev_sample=prev_sample,
        with_log_prob=settings.eta > 0 if with_log_prob is None else with_log_prob,
    )


@dataclass(frozen=True)
class Rollout:
    """A batch of B trajectories of T denoising steps over latents of shape (C, h, w). Frozen: derive new ones.

    - ``prompts``: B strings; ``conditioning``: their embeddings ``[B, L, D]`` (and negative ones when guided);
      ``seeds`` ``[B]`` (int64, see :func:`sample_seed`)
    - ``latents`` ``[B, T+1, C, h, w]``: x_T, …, x_0 (``latents[:, j]`` is the input of step j)
    - ``timesteps`` ``[B, T]`` (int64): the t of step j
    - ``log_probs`` ``[B, T]``: log π(x_{t-1} | x_t) of each step, reduced over pixels as the settings say;
      None when sampled with η = 0 (a deterministic step has no density)
    - ``means`` ``[B, T, C, h, w]`` (optional): μ_θ of each step; ``stds`` ``[T]`` (with means): σ_t of each step;
      ``x0_preds`` ``[B, T, C, h, w]`` (optional); ``outputs`` ``[B, T, C, h, w]`` (optional): the (guided)
      denoiser output of each step
    - ``images`` ``[B, 3, H, W]`` in [0, 1], decoded from x_0; ``rewards`` ``[B]`` once scored (:meth:`with_rewards`),
      or per step ``[B, T]`` for a method that scores along the chain (the last column the final image's)
    """

    prompts: list[str]
    conditioning: Conditioning
    seeds: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor | None
    images: torch.Tensor
    means: torch.Tensor | None = None
    stds: torch.Tensor | None = None
    x0_preds: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    outputs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    @property
    def prompt_embeds(self) -> torch.Tensor:
        return self.conditioning.prompt_embeds

    @property
    def negative_embeds(self) -> torch.Tensor | None:
        return self.conditioning.negative_embeds

    def with_rewards(self, rewards: torch.Tensor) -> Rollout:
        """The same rollout with ``rewards`` ``[B]`` (or per step ``[B, T]``) attached."""
        if rewards.shape not in ((len(self),), (len(self), self.num_steps)):
            raise ValueError(f"rewards must have shape ({len(self)},) or ({len(self)}, {self.num_steps}), "
                             f"got {tuple(rewards.shape)}")
        return dataclasses.replace(self, rewards=rewards)

    def index(self, rows: torch.Tensor | slice) -> Rollout:
        """The sub-batch at ``rows`` (per-sample fields indexed along dim 0; ``stds`` is shared)."""
        rows_list = range(len(self))[rows] if isinstance(rows, slice) else rows.tolist()
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "stds" or value is None:
                continue
            if isinstance(value, (torch.Tensor, Conditioning)):
                values[field.name] = value[rows]
            elif isinstance(value, list):
                values[field.name] = [value[i] for i in rows_list]
        return dataclasses.replace(self, **values)

    @staticmethod
    def cat(rollouts: Sequence[Rollout]) -> Rollout:
        """Concatenates rollouts along the batch dimension."""
        values = {}
        for field in fields(Rollout):
            parts = [getattr(r, field.name) for r in rollouts]
            if parts[0] is None:
                values[field.name] = None
            elif field.name == "stds":
                values[field.name] = parts[0]
            elif isinstance(parts[0], Conditioning):
                negative = None if parts[0].negative_embeds is None else torch.cat([p.negative_embeds for p in parts])
                values[field.name] = Conditioning(torch.cat([p.prompt_embeds for p in parts]), negative)
            elif isinstance(parts[0], list):
                values[field.name] = [p for part in parts for p in part]
            else:
                values[field.name] = torch.cat(parts)
        return Rollout(**values)


@dataclass(frozen=True)
class Transitions:
    """One denoising step of b trajectories (possibly a different step each): x_t → x_{t-1}.

    ``x_t``, ``x_prev`` ``[b, C, h, w]``; ``t`` ``[b]``; ``log_prob_old`` ``[b]`` (at sampling time; None at
    η = 0); ``conditioning`` of the b samples; ``advantages`` ``[b]``; ``step_index`` ``[b]`` (j);
    ``mean_old`` and ``output_old`` ``[b, C, h, w]`` when the rollout recorded means or denoiser outputs;
    ``prompts`` of the b samples.
    """

    x_t: torch.Tensor
    x_prev: torch.Tensor
    t: torch.Tensor
    log_prob_old: torch.Tensor | None
    conditioning: Conditioning
    advantages: torch.Tensor
    step_index: torch.Tensor
    mean_old: torch.Tensor | None = None
    output_old: torch.Tensor | None = None
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return self.x_t.shape[0]


def transitions(rollout: Rollout, rows: torch.Tensor, steps: torch.Tensor, advantages: torch.Tensor) -> Transitions:
    """The transitions of trajectories ``rows`` ``[b]`` at their step indices ``steps`` ``[b]``.

    ``advantages`` is ``[B]`` (one per trajectory) or ``[B, T]`` (one per step).
    """
    return Transitions(
        x_t=rollout.latents[rows, steps],
        x_prev=rollout.latents[rows, steps + 1],
        t=rollout.timesteps[rows, steps],
        log_prob_old=None if rollout.log_probs is None else rollout.log_probs[rows, steps],
        conditioning=rollout.conditioning[rows],
        advantages=advantages[rows] if advantages.ndim == 1 else advantages[rows, steps],
        step_index=steps,
        mean_old=None if rollout.means is None else rollout.means[rows, steps],
        output_old=None if rollout.outputs is None else rollout.outputs[rows, steps],
        prompts=[rollout.prompts[i] for i in rows.tolist()],
    )


def transition_log_prob(policy: Policy, batch: Transitions, settings: StepSettings,
                        guidance: bool = True) -> DDIMStepOutput:
    """Re-scores observed transitions under the current policy: the same step as sampling, given x_{t-1}.

    ``log_prob`` ``[b]`` carries the gradient. ``guidance=False`` scores with the conditional model alone.
    """
    settings = settings if guidance else settings.without_guidance()
    return denoise_step(policy, batch.x_t, batch.t, batch.conditioning, settings, prev_sample=batch.x_prev)


@torch.no_grad()
def reference_mean(policy: Policy, batch: Transitions, settings: StepSettings, guidance: bool = True) -> torch.Tensor:
    """μ_ref ``[b, C, h, w]``: the base model's step mean at the batch's transitions (trainable weights off)."""
    settings = settings if guidance else settings.without_guidance()
    with policy.reference():
        return denoise_step(policy, batch.x_t, batch.t, batch.conditioning, settings, with_log_prob=False,
                            prev_sample=batch.x_prev).mean


def kl_to_reference(policy: Policy, batch: Transitions, step: DDIMStepOutput, settings: StepSettings,
                    guidance: bool = True) -> torch.Tensor:
    """KL(π_θ(·|x_t) ‖ π_ref(·|x_t)) ``[b]`` per transition in closed form (the two Gaussians share σ_t):
    ‖μ_θ − μ_ref‖² / 2σ_t², reduced over pixels as ``settings.reduction``; the gradient flows through μ_θ."""
    ref = reference_mean(policy, batch, settings, guidance)
    return gaussian_kl(step.mean, ref, step.std, reduction=settings.reduction)


def per_sample_noise(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """The next draw ``[rows, *shape]`` of every row's generator (on the CPU in fp32, then moved)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


@torch.no_grad()
def sample(
    policy: Policy,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: StepSettings,
    *,
    x_T: torch.Tensor | None = None,
    record_means: bool = False,
    record_x0_preds: bool = False,
    record_outputs: bool = False,
) -> Rollout:
    """Samples one trajectory per prompt; sample i's noise comes from the streams of ``seeds[i]``.

    x_T is drawn from each seed's x_T stream unless given (``x_T`` ``[B, C, h, w]``, e.g. shared by a pair);
    the per-step noise always comes from the seed's step stream. Noise is drawn on the CPU in fp32 and moved to
    the device, so a seed gives the same trajectory on any device and at any batch size. With η = 0 the steps
    are deterministic and ``log_probs`` is None.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: got {len(prompts)} prompts but {len(seeds)} seeds")
    device, n, shape = policy.device, len(prompts), policy.latent_shape
    if x_T is not None and tuple(x_T.shape) != (n, *shape):
        raise ValueError(f"sample: x_T must have shape {(n, *shape)}, got {tuple(x_T.shape)}")
    step_generators = [noise_generators(s)[1] for s in seeds]
    conditioning = encode(policy, prompts, settings)
    timesteps = policy.schedule.timesteps(settings.num_inference_steps).to(device)

    x = initial_noise(seeds, shape, device) if x_T is None else x_T.to(device)
    latents, log_probs, means, stds, x0_preds, outputs = [x], [], [], [], [], []
    for t in timesteps:
        noise = per_sample_noise(step_generators, shape, device) if settings.eta > 0 else None
        output = guided_output(policy, x, t.expand(n), conditioning, settings)
        step = denoise_step(policy, x, t.expand(n), conditioning, settings, noise=noise, model_output=output)
        if record_outputs:
            outputs.append(output)
        x = step.prev_sample
        latents.append(x)
        log_probs.append(step.log_prob)
        if record_means:
            means.append(step.mean)
            stds.append(step.std.flatten()[0])
        if record_x0_preds:
            x0_preds.append(step.x0_pred)

    return Rollout(
        prompts=list(prompts),
        conditioning=conditioning,
        seeds=torch.tensor([int(s) for s in seeds], dtype=torch.int64),
        latents=torch.stack(latents, dim=1),
        timesteps=timesteps.expand(n, -1).clone(),
        log_probs=torch.stack(log_probs, dim=1) if settings.eta > 0 else None,
        images=policy.decode(x),
        means=torch.stack(means, dim=1) if record_means else None,
        stds=torch.stack(stds) if record_means else None,
        x0_preds=torch.stack(x0_preds, dim=1) if record_x0_preds else None,
        outputs=torch.stack(outputs, dim=1) if record_outputs else None,
    )


def sample_batched(policy: Policy, prompts: Sequence[str], seeds: Sequence[int], settings: StepSettings,
                   batch_size: int, **kwargs) -> Rollout:
    """:func:`sample` in batches of ``batch_size`` (the samples do not depend on the batching), concatenated."""
    if batch_size < 1:
        raise ValueError(f"sample_batched: batch_size must be >= 1, got {batch_size}")
    return Rollout.cat([sample(policy, prompts[i : i + batch_size], seeds[i : i + batch_size], settings, **kwargs)
                        for i in range(0, len(prompts), batch_size)])
