"""The stepwise search both SVDD and DAV's E-step run: branch M children per step, value them, keep one.

From the kept x_t (one per prompt) one batched transition of the proposal model gives the mean μ and σ; M
children x_{t-1}^(m) = μ + shift + σ z_m are drawn (each child from its own noise stream), each valued by the
reward of its x̂_0 (one denoiser pass on the children, which is also the pass the next step needs for the kept
one; at the last step the children are x_0 and are scored directly), and one child is kept by
``log_weights(rewards, log_p_base, log_q, remaining)``: the largest (``greedy``) or a draw from their softmax.

- ``log_q`` is the density of each child under the proposal it was drawn from (with the shift), and
  ``log_p_base`` its density under the base transition: the proposal's unshifted one, or, with
  ``reference_density``, the frozen reference model's (one more pass per step);
- ``shift`` (value gradients): ``shift_scale(remaining, σ)`` · ∇_{x_t} r(decode(x̂_0(x_t))), one forward and
  backward pass per prompt and step, shared by the M children;
- ``remaining`` counts the denoising steps left including the current one (T at the first step, 1 at the last).

With M = 1 and no shift the kept path is exactly :func:`~diffalign.rollout.sample`'s for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffalign.models.policy import Policy
from diffalign.rollout import Conditioning, StepSettings, initial_noise, per_sample_noise
from diffalign.samplers import gaussian_log_prob
from diffalign.steering.base import Meter, Particles, draw

#: (rewards, log_p_base, log_q, remaining steps) → log-weights, all ``[n, M]``.
LogWeights = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class SearchResult:
    """The kept path of each of n prompts: ``latents`` ``[n, T+1, C, h, w]`` (x_T … x_0), ``timesteps``
    ``[n, T]``, ``log_probs`` ``[n, T]`` (log q of each kept child), ``rewards`` ``[n, T]`` (the value of each
    kept child; the last is r(x_0)), ``images`` ``[n, 3, H, W]`` and the prompts' ``conditioning``."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    rewards: torch.Tensor
    images: torch.Tensor
    conditioning: Conditioning


def _density(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    """log N(x; mean, σ²) per row, 0 for a deterministic step (σ = 0: every child is the mean)."""
    if not (std > 0).all():
        return torch.zeros(x.shape[0], device=x.device)
    return gaussian_log_prob(x, mean, std, settings.reduction)


def _choose(log_weights: torch.Tensor, greedy: bool, generator: torch.Generator) -> torch.Tensor:
    """One child index per prompt ``[n]``."""
    return log_weights.argmax(dim=1) if greedy else draw(log_weights, 1, generator).flatten()


def _value_gradient(policy: Policy, x: torch.Tensor, t: torch.Tensor, conditioning, settings: StepSettings,
                    reward, prompts: Sequence[str], meter: Meter) -> torch.Tensor:
    """∇_{x_t} r(decode(x̂_0(x_t))) ``[n, C, h, w]`` through the denoiser, decoder and reward (NaN → 0)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        step = meter.denoise(policy, x, t, conditioning, settings, with_log_prob=False)
        value = meter.score(reward, policy.decode(step.x0_pred), prompts)
        (gradient,) = torch.autograd.grad(value.sum(), x)
    meter.gradient(x.shape[0], settings, conditioning)
    return torch.nan_to_num(gradient.detach())


@torch.no_grad()
def search(policy: Policy, particles: Particles, reward, settings: StepSettings, meter: Meter, *,
           log_weights: LogWeights, greedy: bool, shift_scale: Callable[[int, torch.Tensor], float] | None = None,
           reference_density: bool = False, initial_search: bool = False) -> SearchResult:
    """Searches one path per prompt of ``particles`` (k = M children per step); see the module docstring.

    ``initial_search`` draws M candidates for x_T (their x̂_0 valued and one kept by the weights at
    ``remaining`` = T) instead of one.
    """
    prompts, m, n = particles.prompts, particles.k, len(particles.prompts)
    shape, device = policy.latent_shape, policy.device
    generator, generators = particles.selection_generator(), particles.step_generators()
    cond_one, cond_all = particles.encode(policy, settings)
    expand = particles.prompt_index.to(device)
    timesteps = policy.schedule.timesteps(settings.num_inference_steps).to(device)
    num_steps = len(timesteps)
    first = (torch.arange(n) * m).to(device)

    candidates = initial_noise(particles.seeds, shape, device)
    if initial_search:
        evaluated = meter.denoise(policy, candidates, timesteps[0].expand(n * m), cond_all, settings,
                                  with_log_prob=False)
        values = particles.grouped(meter.score(reward, policy.decode(evaluated.x0_pred), particles.rows).cpu())
        zeros = torch.zeros(n, m)
        kept = first + _choose(log_weights(values, zeros, zeros, num_steps), greedy, generator).to(device)
        x, current = candidates[kept], _rows(evaluated, kept)
    else:
        x = candidates[first]
        current = meter.denoise(policy, x, timesteps[0].expand(n), cond_one, settings, with_log_prob=False)

    latents, log_probs, rewards = [x], [], []
    for s, t in enumerate(timesteps):
        remaining = num_steps - s
        mean, std = current.mean, current.std
        if shift_scale is not None:
            gradient = _value_gradient(policy, x, t.expand(n), cond_one, settings, reward, prompts, meter)
            mean_q = mean + shift_scale(remaining, std) * gradient
        else:
            mean_q = mean
        if reference_density:
            with policy.reference():
                mean_p = meter.denoise(policy, x, t.expand(n), cond_one, settings, with_log_prob=False).mean
        else:
            mean_p = mean
        mean_rows, std_rows = mean_q[expand], std[expand]
        children = mean_rows + std_rows * per_sample_noise(generators, shape, device)
        log_q = _density(children, mean_rows, std_rows, settings)
        log_p = _density(children, mean_p[expand], std_rows, settings)
        if s < num_steps - 1:
            evaluated = meter.denoise(policy, children, timesteps[s + 1].expand(n * m), cond_all, settings,
                                      with_log_prob=False)
            images = policy.decode(evaluated.x0_pred)
        else:
            images = policy.decode(children)
        values = particles.grouped(meter.score(reward, images, particles.rows).cpu())
        choice = _choose(log_weights(values, particles.grouped(log_p.cpu()), particles.grouped(log_q.cpu()),
                                     remaining), greedy, generator)
        kept = first + choice.to(device)
        x = children[kept]
        if s < num_steps - 1:
            current = _rows(evaluated, kept)
        latents.append(x)
        log_probs.append(log_q[kept].cpu())
        rewards.append(values[torch.arange(n), choice])
    return SearchResult(torch.stack(latents, dim=1), timesteps.expand(n, -1).cpu().clone(),
                        torch.stack(log_probs, dim=1), torch.stack(rewards, dim=1), images[kept], cond_one)


def _rows(step, rows: torch.Tensor):
    """The step output restricted to ``rows``."""
    return type(step)(*(None if v is None else v[rows] for v in (step.prev_sample, step.mean, step.std,
                                                                    step.x0_pred, step.log_prob)))
