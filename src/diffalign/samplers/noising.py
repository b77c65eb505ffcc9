"""The forward (noising) process and its closed forms, as small pure functions.

The schedule (``alphas_cumprod``, ᾱ_t for t = 0..T−1) is passed in and timesteps are per-sample tensors
``[B]`` (or scalars), as in :mod:`diffalign.samplers.ddim`:

- :func:`q_sample` draws x_t ~ q(x_t | x_0) from given noise (DDPM eq. 4);
- :func:`diffusion_target` is what a denoiser regresses for that x_t: ε, x_0 or v;
- :func:`backward_log_prob` scores the fixed noising kernel q(x_t | x_prev) between two strided timesteps
  (the "backward policy" of a GFlowNet over the sampling chain x_T → … → x_0);
- :func:`gaussian_kl` is the closed-form KL between two Gaussian steps of equal σ (DDPM eq. 8's term).

Log-probs and KLs are reduced over every non-batch dimension by ``"mean"`` (the per-pixel average, DDPO's
default for the DDIM log-prob) or ``"sum"`` (the exact density of the whole sample). The two differ by the
number of pixels D = C·H·W of one sample: a coefficient β tuned against a ``"mean"`` quantity becomes β / D
against the ``"sum"`` one (β·mean = (β / D)·sum).

Provenance: Ho et al. 2020 (DDPM) eqs. 4 and 8; Song et al. 2021 (DDIM) for the strided timesteps and the
final step's ᾱ; Salimans & Ho 2022 eq. 10 for v; Kingma et al. 2021 (VDM) §3.1 for the kernel between two
arbitrary timesteps. Computed in fp32.
"""

from __future__ import annotations

import torch

from diffalign.samplers.ddim import _LOG_SQRT_2PI, PredictionType, Reduction, _gather, _gather_prev


def _reduce(values: torch.Tensor, reduction: Reduction, caller: str) -> torch.Tensor:
    """``values`` ``[B, ...]`` reduced over every non-batch dimension to ``[B]``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{caller}: reduction must be 'mean' or 'sum', got {reduction!r}")
    dims = tuple(range(1, values.ndim))
    return values.mean(dim=dims) if reduction == "mean" else values.sum(dim=dims)


def _alpha_t(t: torch.Tensor | int, alphas_cumprod: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for per-sample ``t`` (``[B]`` or a scalar), fp32, shaped ``[B, 1, ..., 1]`` to broadcast with ``like``."""
    t = torch.as_tensor(t, device=like.device).long().expand(like.shape[0])
    return _gather(alphas_cumprod.to(device=like.device, dtype=torch.float32), t, like.ndim)


def q_sample(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4), for per-sample ``t``; same shape and dtype as ``x0``.

    ``noise`` is ε ~ N(0, I) of ``x0``'s shape (pass it: randomness is the caller's).
    """
    alpha_t = _alpha_t(t, alphas_cumprod, x0)
    return (alpha_t.sqrt() * x0.float() + (1 - alpha_t).sqrt() * noise.float()).to(x0.dtype)


def diffusion_target(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """What the denoiser regresses for x_t = :func:`q_sample` ``(x0, noise, t)``: ε (``"epsilon"``), x_0
    (``"sample"``) or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (``"v_prediction"``, Salimans & Ho 2022 eq. 10).

    These are the targets :func:`~diffalign.samplers.ddim.ddim_step` inverts into x̂_0 (DDIM eq. 12).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        alpha_t = _alpha_t(t, alphas_cumprod, x0)
        return (alpha_t.sqrt() * noise.float() - (1 - alpha_t).sqrt() * x0.float()).to(x0.dtype)
    raise ValueError(
        f"diffusion_target: prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}"
    )


def gaussian_kl(
    mean_p: torch.Tensor,
    mean_q: torch.Tensor,
    std: torch.Tensor | float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """KL(N(μ_p, σ²I) ‖ N(μ_q, σ²I)) ``[B]``: ‖μ_p − μ_q‖² / (2σ²) per pixel (DDPM eq. 8 without its constant),
    reduced over the non-batch dimensions by ``reduction`` (``"sum"`` is the exact KL of the whole sample).

    ``mean_p`` and ``mean_q`` are ``[B, C, H, W]`` (e.g. the policy's and the reference's DDIM means at the same
    x_t); ``std`` σ > 0 broadcasts to them (``DDIMStepOutput.std`` is ``[B, 1, 1, 1]``). The KL is symmetric in
    the two means when σ is shared. Gradients flow through both means (detach the reference yourself).
    """
    std = torch.as_tensor(std, device=mean_p.device, dtype=torch.float32)
    if not (std > 0).all():
        raise ValueError(
            f"gaussian_kl: std must be > 0, got min {std.min().item()} (a deterministic step, eta = 0, has no KL)"
        )
    kl = (mean_p.float() - mean_q.float()) ** 2 / (2 * std**2)
    return _reduce(kl, reduction, "gaussian_kl")


def _stride_kernel(x_prev: torch.Tensor, t, t_prev, alphas_cumprod: torch.Tensor,
                   final_alpha_cumprod: float | torch.Tensor, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, C, H, W]`` and variance ``[B, 1, 1, 1]`` of q(x_t | x_prev) across a stride t_prev < t."""
    t = torch.as_tensor(t, device=x_prev.device).long().expand(x_prev.shape[0])
    t_prev = torch.as_tensor(t_prev, device=x_prev.device).long().expand(x_prev.shape[0])
    if (t_prev >= t).any():
        raise ValueError(
            f"{caller}: t_prev must be < t (x_prev is the less noisy sample), got t={t.tolist()}, "
            f"t_prev={t_prev.tolist()}"
        )
    alphas_cumprod = alphas_cumprod.to(device=x_prev.device, dtype=torch.float32)
    final = torch.as_tensor(final_alpha_cumprod, device=x_prev.device, dtype=torch.float32)
    alpha_t = _gather(alphas_cumprod, t, x_prev.ndim)
    alpha_prev = _gather_prev(alphas_cumprod, t_prev, final, x_prev.ndim)
    ratio = alpha_t / alpha_prev  # ᾱ_t / ᾱ_prev = ∏ (1 − β_s) over the stride
    return ratio.sqrt() * x_prev.float(), 1 - ratio


def renoise(
    x_prev: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    *,
    final_alpha_cumprod: float | torch.Tensor,
) -> torch.Tensor:
    """x_t ~ q(x_t | x_prev) across the stride t_prev < t from given noise: √(ᾱ_t/ᾱ_prev) x_prev +
    √(1 − ᾱ_t/ᾱ_prev) z (the kernel :func:`backward_log_prob` scores; universal guidance's self-recurrence)."""
    mean, variance = _stride_kernel(x_prev, t, t_prev, alphas_cumprod, final_alpha_cumprod, "renoise")
    return (mean + variance.sqrt() * noise.float()).to(x_prev.dtype)


def backward_log_prob(
    x_t: torch.Tensor,
    x_prev: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    *,
    final_alpha_cumprod: float | torch.Tensor,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """log q(x_t | x_prev) ``[B]`` of the fixed noising kernel between consecutive strided timesteps t_prev < t:

        q(x_t | x_prev) = N(x_t; √(ᾱ_t / ᾱ_prev) x_prev, (1 − ᾱ_t / ᾱ_prev) I)

    (DDPM eq. 2 across a stride; VDM §3.1 with α_{t|s} = √(ᾱ_t/ᾱ_s), σ²_{t|s} = 1 − ᾱ_t/ᾱ_s). ``x_prev`` is the
    less noisy sample (x_{t-1} of a DDIM step), ``x_t`` the noisier one, both ``[B, C, H, W]``; ``t`` and ``t_prev``
    are per-sample (``[B]`` or scalars) and ``t_prev < 0`` uses ``final_alpha_cumprod`` as ᾱ_prev, as
    :func:`~diffalign.samplers.ddim.ddim_step` does.

    ``reduction="mean"`` averages the per-pixel log-density; ``"sum"`` is the exact log-density. A coefficient β
    that multiplies the ``"mean"`` log-prob must be divided by the number of pixels D = C·H·W (``x_t[0].numel()``)
    to weigh the ``"sum"`` log-prob the same: β·mean = (β / D)·sum.
    """
    mean, variance = _stride_kernel(x_prev, t, t_prev, alphas_cumprod, final_alpha_cumprod, "backward_log_prob")
    log_density = -((x_t.float() - mean) ** 2) / (2 * variance) - 0.5 * variance.log() - _LOG_SQRT_2PI
    return _reduce(log_density, reduction, "backward_log_prob")


def epsilon_equivalent_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample factor ``[B]`` that makes a log-prob gradient through the model output scale as an ε-prediction
    model's would: |∂μ/∂ε̂| / |∂μ/∂o| at timestep t.

    The step mean is affine in ε̂ (x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t, DDIM eq. 12), so for an output o:
    ε-prediction: 1; x0-prediction ("sample"): ∂x̂0/∂ε̂ = −√(1−ᾱ_t)/√ᾱ_t, i.e. the factor 1/√SNR_t; v-prediction
    (ε̂ = √ᾱ_t v + √(1−ᾱ_t) x_t): 1/√ᾱ_t. An x0-prediction model's step-t gradient is √SNR_t times an ε model's
    for the same sensitivity of its network, which puts almost all of it on the last, low-noise steps.
    """
    alpha = alphas_cumprod.to(t.device)[t.long()].float()
    if prediction_type == "epsilon":
        return torch.ones_like(alpha)
    if prediction_type == "sample":
        return ((1 - alpha) / alpha).sqrt()
    if prediction_type == "v_prediction":
        return alpha.rsqrt()
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def shift_epsilon(model_output: torch.Tensor, delta_epsilon: torch.Tensor, t: torch.Tensor | int,
                  alphas_cumprod: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
    """The denoiser output whose implied noise at the same x_t is ε̂ + Δε (classifier guidance written in ε-space,
    Dhariwal & Nichol 2021 eq. 14, for a model of any parameterisation).

    With x_t fixed, x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t and ε̂ = √ᾱ_t v + √(1−ᾱ_t) x_t (DDIM eq. 12; Salimans & Ho
    2022), so: ε-prediction adds Δε; x0-prediction (``"sample"``) adds −√(1−ᾱ_t)/√ᾱ_t · Δε; v-prediction adds
    Δε/√ᾱ_t (the magnitudes are :func:`epsilon_equivalent_weight`). ``delta_epsilon`` has the output's shape.
    """
    t = torch.as_tensor(t, device=model_output.device).long().expand(model_output.shape[0])
    weight = epsilon_equivalent_weight(t, alphas_cumprod, prediction_type)
    weight = weight.reshape(-1, *([1] * (model_output.ndim - 1)))
    sign = -1.0 if prediction_type == "sample" else 1.0
    return (model_output.float() + sign * weight * delta_epsilon.float()).to(model_output.dtype)
