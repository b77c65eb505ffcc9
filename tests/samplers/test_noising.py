import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal, kl_divergence

from diffalign.models.tiny import SD_SCHEDULER_CONFIG
from diffalign.samplers import backward_log_prob, ddim_step, diffusion_target, gaussian_kl, q_sample

# A two-step toy schedule with round square roots: t = 0: √ᾱ = 0.8, √(1 − ᾱ) = 0.6; t = 1: 0.6 and 0.8.
ALPHAS = torch.tensor([0.64, 0.36])
X0 = torch.tensor([[1.0, 2.0], [1.0, 2.0]]).reshape(2, 1, 1, 2)
NOISE = torch.tensor([[0.5, -1.0], [0.5, -1.0]]).reshape(2, 1, 1, 2)
T = torch.tensor([0, 1])


def test_q_sample_hand_values():
    # sample 0: 0.8·[1, 2] + 0.6·[0.5, −1] = [1.1, 1.0]; sample 1: 0.6·[1, 2] + 0.8·[0.5, −1] = [1.0, 0.4]
    expected = torch.tensor([[1.1, 1.0], [1.0, 0.4]]).reshape(2, 1, 1, 2)
    torch.testing.assert_close(q_sample(X0, NOISE, T, ALPHAS), expected)
    # a scalar t applies to the whole batch: 0.6·[1, 2] + 0.8·[0.5, −1] for both
    torch.testing.assert_close(q_sample(X0, NOISE, 1, ALPHAS), expected[[1, 1]])


@pytest.mark.parametrize(
    "prediction_type, expected",
    [
        ("epsilon", NOISE),
        ("sample", X0),
        # v = √ᾱ ε − √(1 − ᾱ) x0: sample 0: 0.8·[0.5, −1] − 0.6·[1, 2] = [−0.2, −2.0];
        # sample 1: 0.6·[0.5, −1] − 0.8·[1, 2] = [−0.5, −2.2]
        ("v_prediction", torch.tensor([[-0.2, -2.0], [-0.5, -2.2]]).reshape(2, 1, 1, 2)),
    ],
)
def test_diffusion_target_hand_values(prediction_type, expected):
    torch.testing.assert_close(diffusion_target(X0, NOISE, T, ALPHAS, prediction_type), expected)


def test_diffusion_target_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type must be .* got 'flow'"):
        diffusion_target(X0, NOISE, T, ALPHAS, "flow")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_target_is_what_the_ddim_step_inverts(prediction_type):
    """Fed the exact target at x_t = q_sample(x0, ε, t), the sampler's x̂0 (DDIM eq. 12) recovers x0."""
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 500, 990])
    x_t = q_sample(x0, noise, t, scheduler.alphas_cumprod)
    target = diffusion_target(x0, noise, t, scheduler.alphas_cumprod, prediction_type)
    step = ddim_step(target, x_t, t, t - 50, scheduler.alphas_cumprod, eta=0.0, with_log_prob=False,
                     final_alpha_cumprod=scheduler.final_alpha_cumprod, prediction_type=prediction_type)
    torch.testing.assert_close(step.x0_pred, x0, atol=1e-4, rtol=1e-4)


def test_gaussian_kl_hand_value():
    # (μ_p − μ_q)² / (2σ²) with σ = 2: (1 − 0)²/8 = 0.125 and (3 − 1)²/8 = 0.5 → mean 0.3125, sum 0.625
    mean_p, mean_q = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, 2.0), torch.tensor([0.3125]))
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, 2.0, reduction="sum"), torch.tensor([0.625]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_kl_equals_torch_kl_of_normals(reduction):
    generator = torch.Generator().manual_seed(0)
    mean_p, mean_q = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    std = torch.tensor([0.1, 0.5, 2.0]).reshape(3, 1, 1, 1)  # per-sample σ, as DDIMStepOutput.std
    per_pixel = kl_divergence(Normal(mean_p, std.expand_as(mean_p)), Normal(mean_q, std.expand_as(mean_q)))
    expected = per_pixel.mean(dim=(1, 2, 3)) if reduction == "mean" else per_pixel.sum(dim=(1, 2, 3))
    kl = gaussian_kl(mean_p, mean_q, std, reduction=reduction)
    assert kl.shape == (3,)
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(gaussian_kl(mean_p, mean_p.clone(), std, reduction=reduction), torch.zeros(3))


def test_gaussian_kl_rejects_zero_std_and_bad_reduction():
    with pytest.raises(ValueError, match="std must be > 0"):
        gaussian_kl(torch.zeros(1, 2), torch.ones(1, 2), 0.0)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        gaussian_kl(torch.zeros(1, 2), torch.ones(1, 2), 1.0, reduction="max")


def test_backward_log_prob_hand_value():
    # ᾱ_prev = 0.8, ᾱ_t = 0.2: q(x_t | x_prev) = N(√0.25 x_prev, 0.75); x_prev = 2, x_t = 1 sits on the mean, so
    # the log-density is −½ log(2π · 0.75) per pixel (mean and sum equal for one pixel).
    alphas = torch.tensor([0.8, 0.2])
    lp = backward_log_prob(torch.ones(1, 1), torch.full((1, 1), 2.0), 1, 0, alphas, final_alpha_cumprod=1.0)
    torch.testing.assert_close(lp, torch.tensor([-0.5 * math.log(2 * math.pi * 0.75)]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_log_prob_equals_normal_log_prob(reduction):
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    alphas, final = scheduler.alphas_cumprod, scheduler.final_alpha_cumprod
    generator = torch.Generator().manual_seed(1)
    x_prev, x_t = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t, t_prev = torch.tensor([981, 501, 1]), torch.tensor([961, 481, -19])  # the last one is the final step
    alpha_prev = torch.stack([alphas[961], alphas[481], torch.as_tensor(final)]).reshape(3, 1, 1, 1)
    ratio = alphas[t].reshape(3, 1, 1, 1) / alpha_prev
    per_pixel = Normal(ratio.sqrt() * x_prev, (1 - ratio).sqrt()).log_prob(x_t)
    expected = per_pixel.mean(dim=(1, 2, 3)) if reduction == "mean" else per_pixel.sum(dim=(1, 2, 3))
    lp = backward_log_prob(x_t, x_prev, t, t_prev, alphas, final_alpha_cumprod=final, reduction=reduction)
    assert lp.shape == (3,)
    torch.testing.assert_close(lp, expected)


def test_backward_log_prob_sum_is_mean_times_pixels():
    """The docstring's β rescaling: β·mean = (β / D)·sum with D = C·H·W pixels."""
    alphas = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod
    x_prev, x_t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    args = (x_t, x_prev, torch.tensor([500, 300]), torch.tensor([480, 280]), alphas)
    mean = backward_log_prob(*args, final_alpha_cumprod=1.0)
    total = backward_log_prob(*args, final_alpha_cumprod=1.0, reduction="sum")
    torch.testing.assert_close(total, mean * 4 * 8 * 8)


def test_backward_log_prob_rejects_t_prev_not_below_t():
    with pytest.raises(ValueError, match="t_prev must be < t"):
        backward_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), 5, 5, torch.linspace(0.99, 0.01, 10),
                          final_alpha_cumprod=1.0)


def test_epsilon_equivalent_weight_hand_values():
    from diffalign.samplers import epsilon_equivalent_weight

    alphas = torch.tensor([0.8, 0.5, 0.2])
    t = torch.tensor([0, 1, 2])
    # x0-prediction: √((1 − ᾱ)/ᾱ) = 1/√SNR; v-prediction: 1/√ᾱ; ε-prediction: 1
    torch.testing.assert_close(epsilon_equivalent_weight(t, alphas, "sample"), torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(epsilon_equivalent_weight(t, alphas, "v_prediction"), alphas.rsqrt())
    torch.testing.assert_close(epsilon_equivalent_weight(t, alphas, "epsilon"), torch.ones(3))
    with pytest.raises(ValueError, match="prediction_type"):
        epsilon_equivalent_weight(t, alphas, "flow")


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_shift_epsilon_moves_the_implied_noise_by_delta_in_every_parameterisation(prediction_type):
    # The denoiser output that an ε̂ model would give as ε̂ + Δε must make the same DDIM step, whatever the model
    # predicts: the x0 and v outputs are built from (x_t, ε̂) by DDIM eq. 12 and Salimans & Ho's v, then shifted.
    from diffalign.samplers import shift_epsilon

    generator = torch.Generator().manual_seed(0)
    x_t, eps, delta = (torch.randn(2, 1, 1, 2, generator=generator) for _ in range(3))
    a = ALPHAS[T].reshape(2, 1, 1, 1)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    output = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]
    shifted = shift_epsilon(output, delta, T, ALPHAS, prediction_type)

    def mean(model_output, kind):
        return ddim_step(model_output, x_t, T, T - 1, ALPHAS, eta=0.0, final_alpha_cumprod=1.0,
                         prediction_type=kind, with_log_prob=False).mean

    torch.testing.assert_close(mean(shifted, prediction_type), mean(eps + delta, "epsilon"))
    # and the shift is not a no-op
    assert not torch.allclose(mean(shifted, prediction_type), mean(eps, "epsilon"))
