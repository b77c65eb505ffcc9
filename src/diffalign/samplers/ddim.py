"""The DDIM transition with its log-probability, as small pure functions.

One function, :func:`ddim_step`, serves sampling (draws ``x_{t-1}`` from given noise) and training (scores an
observed ``x_{t-1}``). Timesteps are per-sample tensors, so a training batch may mix steps. Nothing here keeps
state: the schedule (``alphas_cumprod``) is passed in.

Provenance: DDIM (Song et al., 2021) eqs. 12 and 16; the log-prob follows DDPO's ``ddim_step_with_logprob``
(kvablack/ddpo-pytorch), computed in fp32, with the reduction over pixels explicit (``"mean"``, DDPO's default,
keeps PPO ratios sane; ``"sum"`` is the exact density).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]
Reduction = Literal["mean", "sum"]
Spacing = Literal["leading", "trailing", "linspace"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class DDIMStepOutput:
    """The result of one DDIM step; every tensor is ``[B, C, H, W]`` except ``log_prob`` ``[B]``.

    ``prev_sample`` is x_{t-1} (the drawn or the observed one), ``mean`` μ_θ(x_t, t), ``std`` σ_t broadcast to
    ``[B, 1, 1, 1]``, ``x0_pred`` x̂_0, and ``log_prob`` log N(x_{t-1}; μ, σ²) reduced over pixels (None when
    not asked for).
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    x0_pred: torch.Tensor
    log_prob: torch.Tensor | None


def inference_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: Spacing = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """The descending timesteps ``[N]`` diffusers' DDIMScheduler uses for ``spacing`` (long tensor).

    leading: ``arange(N) * (T // N) + steps_offset``, reversed (SD 1.5, N = 50: 981, …, 1).
    trailing: ``round(arange(T, 0, -T/N)) - 1`` (N = 50: 999, …, 19).
    linspace: ``round(linspace(0, T - 1, N))``, reversed.
    """
    if not 0 < num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, {num_train_timesteps}] (num_train_timesteps), "
            f"got {num_inference_steps}"
        )
    if spacing == "leading":
        ratio = num_train_timesteps // num_inference_steps
        steps = torch.arange(num_inference_steps, dtype=torch.float64).mul(ratio).round().flip(0) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_inference_steps
        steps = torch.arange(num_train_timesteps, 0, -ratio, dtype=torch.float64).round() - 1
    elif spacing == "linspace":
        steps = torch.linspace(0, num_train_timesteps - 1, num_inference_steps, dtype=torch.float64).round().flip(0)
    else:
        raise ValueError(f"timestep spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    if steps.max() >= num_train_timesteps or steps.min() < 0:  # leading spacing + steps_offset can overshoot
        raise ValueError(
            f"{num_inference_steps} steps with {spacing!r} spacing and steps_offset {steps_offset} reach timestep "
            f"{int(steps.max() if steps.max() >= num_train_timesteps else steps.min())}, outside the schedule's "
            f"[0, {num_train_timesteps - 1}]; use fewer steps"
        )
    return steps.long()


def previous_timestep(t: torch.Tensor, num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """t − ⌊T/N⌋; a negative result marks the final step (ᾱ_prev = ``final_alpha_cumprod``)."""
    return t - num_train_timesteps // num_inference_steps


def _gather(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[index] for per-sample indices [B], broadcastable to a [B, ...] tensor of ``ndim`` dims."""
    return values[index].reshape(-1, *([1] * (ndim - 1)))


def _gather_prev(alphas_cumprod: torch.Tensor, t_prev: torch.Tensor, final: torch.Tensor, ndim: int) -> torch.Tensor:
    """ᾱ_prev for per-sample ``t_prev`` [B] (``final`` where t_prev < 0, the last step), shaped like :func:`_gather`."""
    return torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)], final).reshape(-1, *([1] * (ndim - 1)))


def ddim_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    eta: float,
    final_alpha_cumprod: float | torch.Tensor,
    prediction_type: PredictionType = "epsilon",
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    with_log_prob: bool = True,
    reduction: Reduction = "mean",
    clip_sample_range: float | None = None,
) -> DDIMStepOutput:
    """One DDIM step x_t → x_{t-1} for per-sample timesteps ``t`` and ``t_prev`` (``[B]`` or scalars).

    Pass ``noise`` (z ~ N(0, I), shape of ``x_t``) to draw x_{t-1} = μ + σ_t z, or ``prev_sample`` to score an
    observed x_{t-1}; the log-prob's gradient flows through μ only. With neither (and ``with_log_prob=False``)
    the step is only evaluated: ``prev_sample`` is the mean. ``t_prev < 0`` uses ``final_alpha_cumprod``.
    With ``eta = 0`` the step is deterministic and has no density: asking for a log-prob is an error.
    """
    if noise is not None and prev_sample is not None:
        raise ValueError("ddim_step: pass either noise (to sample) or prev_sample (to score), not both")
    if eta < 0:
        raise ValueError(f"ddim_step: eta must be >= 0, got {eta}")
    if with_log_prob and eta == 0:
        raise ValueError(
            "ddim_step: eta = 0 makes the DDIM step deterministic (σ_t = 0), so it has no log-prob; "
            "use eta > 0 (DDPO uses 1.0) or with_log_prob=False"
        )
    if eta > 0 and noise is None and prev_sample is None and with_log_prob:
        raise ValueError("ddim_step: a stochastic step (eta > 0) needs noise or prev_sample to have a log-prob")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"ddim_step: reduction must be 'mean' or 'sum', got {reduction!r}")

    dtype = x_t.dtype
    x_t, model_output = x_t.float(), model_output.float()
    alphas_cumprod = alphas_cumprod.to(device=x_t.device, dtype=torch.float32)
    t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
    t_prev = torch.as_tensor(t_prev, device=x_t.device).long().expand(x_t.shape[0])
    final = torch.as_tensor(final_alpha_cumprod, device=x_t.device, dtype=torch.float32)

    alpha_t = _gather(alphas_cumprod, t, x_t.ndim)
    alpha_prev = _gather_prev(alphas_cumprod, t_prev, final, x_t.ndim)
    beta_t = 1 - alpha_t

    # x̂0 and ε̂ for each parameterisation (DDIM eq. 12 / Salimans & Ho 2022 for v).
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - beta_t.sqrt() * eps) / alpha_t.sqrt()
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - alpha_t.sqrt() * x0) / beta_t.sqrt()
    elif prediction_type == "v_prediction":
        x0 = alpha_t.sqrt() * x_t - beta_t.sqrt() * model_output
        eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * x_t
    else:
        raise ValueError(
            f"ddim_step: prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}"
        )
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
        eps = (x_t - alpha_t.sqrt() * x0) / beta_t.sqrt()

    # DDIM eq. 16: σ_t² = η² (1 − ᾱ_prev)/(1 − ᾱ_t) (1 − ᾱ_t/ᾱ_prev); eq. 12 for the mean.
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps

    if prev_sample is None:
        prev_sample = mean if noise is None else mean + std * noise.float()
    prev_sample = prev_sample.float().detach()

    log_prob = gaussian_log_prob(prev_sample, mean, std, reduction) if with_log_prob else None
    return DDIMStepOutput(prev_sample.to(dtype), mean, std, x0, log_prob)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      reduction: Reduction = "mean") -> torch.Tensor:
    """log N(x; μ, σ²I) ``[B]`` of samples ``[B, ...]``, reduced over pixels (``"mean"`` or ``"sum"``); σ > 0
    broadcasts to ``x``. The gradient flows through ``mean`` (and ``x`` if it has one)."""
    log_density = -((x.float() - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
    dims = tuple(range(1, x.ndim))
    return log_density.mean(dim=dims) if reduction == "mean" else log_density.sum(dim=dims)
