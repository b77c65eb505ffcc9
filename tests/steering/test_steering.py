"""Test-time steering: each method against plain sampling, hand-computed weights and counted compute."""

import pytest
import torch
from torch import nn

from diffalign.models import add_lora
from diffalign.rewards import get
from diffalign.rollout import StepSettings, sample, sample_seed
from diffalign.steering import (
    STEERERS, BestOfNConfig, FKConfig, GuidanceConfig, SVDDConfig, best_of_n, fk, guidance, svdd,
)
from diffalign.steering.base import Meter, Particles, draw
from diffalign.steering.fk import _Population, potentials
from diffalign.steering.search import search

SETTINGS = StepSettings(num_inference_steps=4, guidance_scale=1.0, eta=1.0)
GUIDED = StepSettings(num_inference_steps=3, guidance_scale=3.0, eta=1.0)
PROMPTS = ["a cat", "a dog"]


def _plain(policy, prompts, seed, settings=SETTINGS, k=1):
    """Plain samples of the particles' seeds (prompt-major)."""
    rows = [p for p in prompts for _ in range(k)]
    return sample(policy, rows, [sample_seed(seed, 0, i) for i in range(len(rows))], settings)


@pytest.mark.parametrize("run, config", [
    (fk, FKConfig(particles=1, resample_every=1, resample_start=0, adaptive=False)),
    (svdd, SVDDConfig(particles=1)),
    (best_of_n, BestOfNConfig(particles=1)),
])
def test_one_particle_is_plain_sampling(tiny_policy, run, config):
    result = run(tiny_policy, PROMPTS, get("brightness"), SETTINGS, config, seed=3)
    plain = _plain(tiny_policy, PROMPTS, 3)
    assert torch.equal(result.latents, plain.latents[:, -1])
    assert torch.equal(result.images, plain.images)


def test_best_of_n_returns_the_argmax(tiny_policy):
    reward = get("brightness")
    result = best_of_n(tiny_policy, PROMPTS, reward, SETTINGS, BestOfNConfig(particles=3), seed=5)
    plain = _plain(tiny_policy, PROMPTS, 5, k=3)
    scores = reward(plain.images, plain.prompts).reshape(2, 3)
    best = scores.argmax(dim=1) + torch.tensor([0, 3])
    assert torch.equal(result.images, plain.images[best])
    torch.testing.assert_close(result.rewards, scores.max(dim=1).values)
    assert result.rewards[0] == scores[0].max() and (scores.max(dim=1).values > scores.min(dim=1).values).all()


def test_potentials_on_hand_values():
    r, prev = torch.tensor([0.5, 0.2]), torch.tensor([0.1, 0.3])
    torch.testing.assert_close(potentials(r, prev, 10.0, "diff"), torch.tensor([4.0, -1.0]))
    torch.testing.assert_close(potentials(r, prev, 10.0, "max"), torch.tensor([5.0, 3.0]))
    torch.testing.assert_close(potentials(r, prev, 10.0, "add"), torch.tensor([6.0, 5.0]))
    torch.testing.assert_close(potentials(r, prev, 10.0, "rt"), torch.tensor([5.0, 2.0]))
    weights = torch.softmax(potentials(r, prev, 10.0, "diff"), dim=0)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    torch.testing.assert_close(weights[0] / weights[1], torch.tensor(5.0).exp())


def test_resampling_follows_the_weights_and_the_final_correction_telescopes():
    config = FKConfig(particles=2, potential="rt", lam=2.0, adaptive=False)
    population = _Population(1, 2, config, torch.Generator().manual_seed(0))
    population.weigh(torch.tensor([[0.0, 30.0]]))  # particle 1 is e^60 times likelier: every draw takes it
    latents = torch.tensor([[10.0], [20.0]])
    assert population.resample(latents).flatten().tolist() == [20.0, 20.0]
    assert population.log_weights.tolist() == [[0.0, 0.0]] and population.lineage.tolist() == [[60.0, 60.0]]
    # rt's final weight divides the lineage's potentials out: exp(λ r(x_0)) / exp(60)
    final = population.final_log_weights(torch.tensor([[1.0, 3.0]]))
    torch.testing.assert_close(final, torch.tensor([[2.0 - 60.0, 6.0 - 60.0]]))
    draws = draw(torch.log(torch.tensor([[0.2, 0.8]])), 2000, torch.Generator().manual_seed(1))
    assert abs(draws.float().mean().item() - 0.8) < 0.03


class CountingUNet(nn.Module):
    """The UNet, counting the latent rows of every forward pass and of every backward pass through it."""

    def __init__(self, unet):
        super().__init__()
        self.module, self.rows, self.backward_rows = unet, 0, 0

    def forward(self, x, t, encoder_hidden_states):
        self.rows += x.shape[0]
        if x.requires_grad:
            x.register_hook(lambda grad: self._backward(grad.shape[0]))
        return self.module(x, t, encoder_hidden_states=encoder_hidden_states)

    def _backward(self, rows):
        self.backward_rows += rows


class CountingReward:
    """A reward wrapper counting the images it scores."""

    def __init__(self, reward):
        self.reward, self.images = reward, 0
        self.name, self.differentiable = reward.name, reward.differentiable

    def __call__(self, images, prompts):
        self.images += images.shape[0]
        return self.reward(images, prompts)


@pytest.mark.parametrize("name, config", [
    ("best-of-n", BestOfNConfig(particles=3)),
    ("fk", FKConfig(particles=3, resample_every=1, resample_start=0, adaptive=False)),
    ("svdd", SVDDConfig(particles=3, temperature=0.5)),
    ("guidance", GuidanceConfig(particles=2, scale=0.5, repeats=2)),
])
def test_reported_compute_is_the_compute_spent(tiny_policy, name, config):
    tiny_policy.unet = CountingUNet(tiny_policy.unet)
    reward = CountingReward(get("brightness"))
    result = STEERERS[name].run(tiny_policy, PROMPTS, reward, GUIDED, config, seed=1)
    assert result.images.shape[0] == 2 and result.denoiser_passes > 0
    assert result.denoiser_passes == tiny_policy.unet.rows
    assert result.gradient_passes == tiny_policy.unet.backward_rows
    assert result.reward_calls == reward.images
    if name == "guidance":  # 2 prompts × 2 particles × 3 steps × 2 repeats, each a guided (2-row) pass
        assert result.denoiser_passes == result.gradient_passes == 2 * 2 * 3 * 2 * 2


def test_svdd_keeps_the_best_candidate_every_step(tiny_policy):
    seen = []

    def log_weights(rewards, log_p, log_q, remaining):
        seen.append((rewards, log_p - log_q, remaining))
        return rewards

    particles = Particles.of(PROMPTS, 3, seed=2)
    found = search(tiny_policy, particles, get("brightness"), SETTINGS, Meter(), log_weights=log_weights, greedy=True)
    assert [remaining for *_, remaining in seen] == [4, 3, 2, 1]
    for step, (values, log_ratio, _) in enumerate(seen):
        assert values.shape == (2, 3) and (values.max(dim=1).values > values.min(dim=1).values).all()
        torch.testing.assert_close(found.rewards[:, step], values.max(dim=1).values)
        assert torch.equal(log_ratio, torch.zeros(2, 3))  # no shift: proposal = base transition
    assert found.latents.shape[:2] == (2, 5) and found.images.shape[0] == 2


def test_guidance_climbs_the_reward(tiny_policy):
    reward = get("brightness")
    plain = guidance(tiny_policy, PROMPTS, reward, SETTINGS, GuidanceConfig(scale=0.0), seed=4)
    assert torch.equal(plain.images, _plain(tiny_policy, PROMPTS, 4).images)
    guided = guidance(tiny_policy, PROMPTS, reward, SETTINGS, GuidanceConfig(scale=20.0), seed=4)
    assert (guided.rewards > plain.rewards).all()


def test_invalid_settings_are_refused_before_sampling(tiny_policy):
    deterministic = StepSettings(num_inference_steps=4, guidance_scale=1.0, eta=0.0)
    with pytest.raises(ValueError, match="eta > 0"):
        fk(tiny_policy, PROMPTS, get("brightness"), deterministic, FKConfig())
    with pytest.raises(ValueError, match="eta > 0"):
        svdd(tiny_policy, PROMPTS, get("brightness"), deterministic, SVDDConfig())
    with pytest.raises(ValueError, match="guidance.*'jpeg_compressibility' is not differentiable"):
        guidance(tiny_policy, PROMPTS, get("jpeg_compressibility"), SETTINGS, GuidanceConfig())
    with pytest.raises(ValueError, match="particles must be >= 1"):
        best_of_n(tiny_policy, PROMPTS, get("brightness"), SETTINGS, BestOfNConfig(particles=0))
    assert FKConfig(resample_every=0).validate(SETTINGS, None) == ["resample_every must be >= 1, got 0"]


def test_steering_a_lora_policy_uses_the_trained_weights(tiny_policy):
    add_lora(tiny_policy.unet, rank=2, alpha=2.0)
    result = best_of_n(tiny_policy, PROMPTS, get("brightness"), SETTINGS, BestOfNConfig(particles=2), seed=0)
    assert result.images.shape[0] == 2 and torch.isfinite(result.rewards).all()
