import pytest
import torch
from diffusers import DDIMScheduler

from diffalign.models.tiny import SD_SCHEDULER_CONFIG
from diffalign.samplers import ddim_step, inference_timesteps, previous_timestep


def _scheduler(**overrides):
    return DDIMScheduler(**{**SD_SCHEDULER_CONFIG, **overrides})


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_timesteps_match_diffusers(spacing, steps):
    scheduler = _scheduler(timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    ours = inference_timesteps(1000, steps, spacing, scheduler.config.steps_offset)
    assert torch.equal(ours, scheduler.timesteps.long())


def test_sd15_leading_timesteps_hand_values():
    steps = inference_timesteps(1000, 50, "leading", 1)
    assert steps[0].item() == 981 and steps[-1].item() == 1 and len(steps) == 50
    assert inference_timesteps(1000, 50, "trailing")[:2].tolist() == [999, 979]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_equals_diffusers_ddim_step(prediction_type, spacing, eta):
    scheduler = _scheduler(prediction_type=prediction_type, timestep_spacing=spacing)
    steps = 10
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps[[0, 4, -1]]:
        x_t = torch.randn(3, 4, 8, 8, generator=g)
        output = torch.randn(3, 4, 8, 8, generator=g)
        noise = torch.randn(3, 4, 8, 8, generator=g)
        expected = scheduler.step(output, t, x_t, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
        ours = ddim_step(
            output, x_t, t, previous_timestep(t, 1000, steps), scheduler.alphas_cumprod, eta=eta,
            final_alpha_cumprod=scheduler.final_alpha_cumprod, prediction_type=prediction_type,
            noise=noise if eta > 0 else None, with_log_prob=eta > 0,
        )
        torch.testing.assert_close(ours.prev_sample, expected, rtol=1e-5, atol=1e-5)


def test_set_alpha_to_one_final_step():
    scheduler = _scheduler(set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[-1]
    x_t, output = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    expected = scheduler.step(output, t, x_t, eta=0.0).prev_sample
    ours = ddim_step(output, x_t, t, previous_timestep(t, 1000, 10), scheduler.alphas_cumprod, eta=0.0,
                     final_alpha_cumprod=scheduler.final_alpha_cumprod, with_log_prob=False)
    torch.testing.assert_close(ours.prev_sample, expected)
    assert previous_timestep(t, 1000, 10).item() < 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction):
    alphas = _scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(1)
    x_t, output, noise = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([901, 501, 101, 1])
    out = ddim_step(output, x_t, t, t - 100, alphas, eta=1.0, final_alpha_cumprod=alphas[0], noise=noise,
                    reduction=reduction)
    density = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample)
    expected = density.mean(dim=(1, 2, 3)) if reduction == "mean" else density.sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-4)


def test_scoring_observed_sample_equals_sampling_log_prob():
    alphas = _scheduler().alphas_cumprod
    x_t, output, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([501, 501])
    drawn = ddim_step(output, x_t, t, t - 100, alphas, eta=1.0, final_alpha_cumprod=alphas[0], noise=noise)
    scored = ddim_step(output, x_t, t, t - 100, alphas, eta=1.0, final_alpha_cumprod=alphas[0],
                       prev_sample=drawn.prev_sample)
    assert torch.equal(drawn.log_prob, scored.log_prob)


def test_mixed_timesteps_equal_per_sample_steps():
    alphas = _scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(2)
    x_t, output, noise = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([981, 481, 1])
    batched = ddim_step(output, x_t, t, t - 20, alphas, eta=1.0, final_alpha_cumprod=alphas[0], noise=noise)
    for i in range(3):
        single = ddim_step(output[i : i + 1], x_t[i : i + 1], t[i], t[i] - 20, alphas, eta=1.0,
                           final_alpha_cumprod=alphas[0], noise=noise[i : i + 1])
        torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample)
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)


def test_log_prob_gradient_flows_through_mean_only():
    alphas = _scheduler().alphas_cumprod
    output = torch.randn(2, 4, 4, 4, requires_grad=True)
    observed = torch.randn(2, 4, 4, 4, requires_grad=True)
    out = ddim_step(output, torch.randn(2, 4, 4, 4), torch.tensor([501, 301]), torch.tensor([481, 281]), alphas,
                    eta=1.0, final_alpha_cumprod=alphas[0], prev_sample=observed)
    out.log_prob.sum().backward()
    assert output.grad is not None and output.grad.abs().sum() > 0
    assert observed.grad is None


def test_errors_are_clear():
    alphas = _scheduler().alphas_cumprod
    x = torch.randn(1, 4, 4, 4)
    t = torch.tensor([501])
    with pytest.raises(ValueError, match="eta = 0"):
        ddim_step(x, x, t, t - 20, alphas, eta=0.0, final_alpha_cumprod=alphas[0])
    with pytest.raises(ValueError, match="not both"):
        ddim_step(x, x, t, t - 20, alphas, eta=1.0, final_alpha_cumprod=alphas[0], noise=x, prev_sample=x)
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(x, x, t, t - 20, alphas, eta=1.0, final_alpha_cumprod=alphas[0])
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step(x, x, t, t - 20, alphas, eta=1.0, final_alpha_cumprod=alphas[0], noise=x, prediction_type="flow")
    with pytest.raises(ValueError, match="num_inference_steps"):
        inference_timesteps(1000, 0)
