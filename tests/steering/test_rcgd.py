"""RCGD: the latent reward model, its guidance term, guided sampling and its bad input."""

import json

import pytest
import torch

from diffalign.models.latent_reward import LatentRewardConfig, LatentRewardModel
from diffalign.rollout import StepSettings
from diffalign.steering import RCGDConfig, rcgd
from diffalign.steering.base import Meter, Particles, propagate
from diffalign.steering.rcgd import target_gradient

SETTINGS = StepSettings(num_inference_steps=4, guidance_scale=1.0, eta=1.0)
PROMPTS = ["a red circle", "two blue squares"]


def _model(policy, label_min=-1.0, label_max=1.0, time_conditioning=True):
    torch.manual_seed(0)
    config = LatentRewardConfig(policy.latent_shape, float(policy.vae.config.scaling_factor), (8, 16),
                                time_conditioning, label_min, label_max, "tiny", "brightness")
    return LatentRewardModel(config).eval()


class MeanLatent(torch.nn.Module):
    """μ(z) = mean of z: a reward model whose gradient is known, with the latent model's interface."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, z, t):
        return z.float().mean(dim=(1, 2, 3))

    def check_compatible(self, *args, **kwargs):
        pass

    def in_label_range(self, target):
        return True


def test_target_gradient_is_per_sample_and_a_step_against_it_moves_mu_toward_the_target():
    # μ(z) = mean(z) over D = 8 entries: ∇ ½(y* − μ)² = (μ − y*)/D on every entry, for each sample on its own
    # (no 1/B from a batch mean).
    model = MeanLatent(None)
    z = torch.stack([torch.full((2, 2, 2), 0.5), torch.full((2, 2, 2), -1.0)])
    gradient, predicted = target_gradient(model, z, torch.zeros(2), target=1.0)
    torch.testing.assert_close(predicted, torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(gradient[0], torch.full((2, 2, 2), (0.5 - 1.0) / 8))
    torch.testing.assert_close(gradient[1], torch.full((2, 2, 2), (-1.0 - 1.0) / 8))


def test_the_guidance_gradient_moves_a_conv_net_toward_the_target(tiny_policy):
    model = _model(tiny_policy)
    z = torch.randn(3, *tiny_policy.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 500)
    for target in (-1.0, 1.0):
        gradient, before = target_gradient(model, z, t, target)
        after = model(z - 0.05 * gradient / gradient.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1), t)
        assert ((after - target).abs() < (before - target).abs()).all()


def test_zero_guidance_is_plain_sampling(tiny_policy):
    model = _model(tiny_policy)
    result = rcgd(tiny_policy, PROMPTS, model, SETTINGS, RCGDConfig(target=0.5, guidance=0.0), seed=3)
    plain = propagate(tiny_policy, Particles.of(PROMPTS, 1, 3), SETTINGS, Meter())
    torch.testing.assert_close(result.latents, plain)
    assert result.reward_calls == len(PROMPTS)  # the final prediction only
    torch.testing.assert_close(result.rewards, model(plain, torch.zeros(2, dtype=torch.long)))


def test_guidance_pulls_the_prediction_toward_the_target(tiny_policy):
    model = MeanLatent(None)
    settings = StepSettings(num_inference_steps=6, guidance_scale=1.0, eta=1.0)
    plain = rcgd(tiny_policy, PROMPTS, model, settings, RCGDConfig(target=0.0, guidance=0.0), seed=0).rewards
    high = rcgd(tiny_policy, PROMPTS, model, settings, RCGDConfig(target=3.0, guidance=500.0), seed=0).rewards
    low = rcgd(tiny_policy, PROMPTS, model, settings, RCGDConfig(target=-3.0, guidance=500.0), seed=0).rewards
    assert (low < plain).all() and (plain < high).all()


def test_counts_and_reproducibility(tiny_policy):
    model = _model(tiny_policy)
    guided = StepSettings(num_inference_steps=3, guidance_scale=4.0, eta=1.0)
    first = rcgd(tiny_policy, PROMPTS, model, guided, RCGDConfig(0.2, 50.0), seed=1)
    second = rcgd(tiny_policy, PROMPTS, model, guided, RCGDConfig(0.2, 50.0), seed=1)
    torch.testing.assert_close(first.latents, second.latents, rtol=0, atol=0)
    assert first.denoiser_passes == 2 * 3 * 2  # prompts × steps × (uncond, cond)
    assert first.reward_calls == 2 * 3 + 2 and first.gradient_passes == 0


def test_target_outside_the_label_range_is_refused_unless_allowed(tiny_policy):
    model = _model(tiny_policy, label_min=0.0, label_max=1.0)
    with pytest.raises(ValueError, match=r"target 2 is outside the reward model's label range \[0, 1\].*--allow-ext"):
        rcgd(tiny_policy, PROMPTS, model, SETTINGS, RCGDConfig(target=2.0), seed=0)
    rcgd(tiny_policy, PROMPTS, model, SETTINGS, RCGDConfig(target=2.0, allow_extrapolation=True), seed=0)


def test_save_load_roundtrip_and_folder_errors(tiny_policy, tmp_path):
    model = _model(tiny_policy)
    model.save(tmp_path / "rm")
    loaded = LatentRewardModel.load(tmp_path / "rm")
    z = torch.randn(2, *tiny_policy.latent_shape)
    torch.testing.assert_close(loaded(z, torch.tensor([0, 900])), model(z, torch.tensor([0, 900])))
    assert loaded.config == model.config
    with pytest.raises(ValueError, match="'.*missing' does not exist"):
        LatentRewardModel.load(tmp_path / "missing")
    (tmp_path / "rm" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        LatentRewardModel.load(tmp_path / "rm")


def test_a_reward_model_for_other_latents_is_refused(tiny_policy, tmp_path):
    config = LatentRewardConfig((4, 8, 8), 0.5, (8,), model="shapes")
    LatentRewardModel(config).save(tmp_path / "other")
    other = LatentRewardModel.load(tmp_path / "other")
    with pytest.raises(ValueError, match=r"trained on latents \(4, 8, 8\).*model 'shapes'.*this model's latents"):
        rcgd(tiny_policy, PROMPTS, other, SETTINGS, RCGDConfig(0.5), seed=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"latent_shape": [4, 16, 16]}))
    (tmp_path / "other" / "model.safetensors").rename(bad / "model.safetensors")
    with pytest.raises(ValueError, match="is not a latent reward model"):
        LatentRewardModel.load(bad)


def test_time_conditioning_changes_the_prediction_only_when_enabled(tiny_policy):
    z = torch.randn(2, *tiny_policy.latent_shape)
    conditioned, agnostic = _model(tiny_policy), _model(tiny_policy, time_conditioning=False)
    assert not torch.allclose(conditioned(z, torch.tensor([0, 0])), conditioned(z, torch.tensor([900, 900])))
    torch.testing.assert_close(agnostic(z, torch.tensor([0, 0])), agnostic(z, torch.tensor([900, 900])))
