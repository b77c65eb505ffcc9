import dataclasses

import pytest
import torch

from diffalign.models import add_lora
from diffalign.rollout import (
    Rollout, StepSettings, denoise_step, encode, kl_to_reference, sample, sample_batched, sample_seed,
    transition_log_prob, transitions,
)

SETTINGS = StepSettings(num_inference_steps=6, guidance_scale=4.0, eta=1.0)


def test_rollout_shapes(tiny_policy):
    r = sample(tiny_policy, ["a cat", "a dog", "a fish"], [1, 2, 3], SETTINGS, record_means=True,
               record_x0_preds=True)
    assert r.latents.shape == (3, 7, 4, 16, 16)
    assert r.timesteps.shape == (3, 6)
    assert r.timesteps.dtype == torch.int64 and (r.timesteps[:, :-1] > r.timesteps[:, 1:]).all()
    assert r.log_probs.shape == (3, 6) and torch.isfinite(r.log_probs).all()
    assert r.means.shape == r.x0_preds.shape == (3, 6, 4, 16, 16)
    assert r.images.shape == (3, 3, 32, 32)
    assert r.prompt_embeds.shape[:2] == (3, 77) and r.negative_embeds.shape == r.prompt_embeds.shape


def test_timesteps_are_the_models_inference_timesteps(tiny_policy):
    r = sample(tiny_policy, ["a cat"], [0], SETTINGS)
    assert r.timesteps[0].tolist() == tiny_policy.schedule.timesteps(6).tolist()


def test_sample_does_not_depend_on_its_batch(tiny_policy):
    prompts = ["a cat", "a dog", "a horse", "a fish"]
    seeds = [sample_seed(7, 0, i) for i in range(4)]
    together = sample(tiny_policy, prompts, seeds, SETTINGS)
    alone = sample(tiny_policy, prompts[2:3], seeds[2:3], SETTINGS)
    pair = sample(tiny_policy, prompts[1:3], seeds[1:3], SETTINGS)
    # The noise is the same to the bit; the denoiser's batched fp32 kernels round differently at other batch
    # sizes (about 1e-5 here), which is the only difference left.
    assert torch.equal(alone.latents[0, 0], together.latents[2, 0])
    torch.testing.assert_close(alone.latents[0], together.latents[2], rtol=0, atol=2e-4)
    torch.testing.assert_close(pair.latents[1], together.latents[2], rtol=0, atol=2e-4)
    torch.testing.assert_close(alone.log_probs[0], together.log_probs[2], rtol=0, atol=1e-5)
    other = sample(tiny_policy, prompts[2:3], [sample_seed(7, 0, 3)], SETTINGS)
    assert (other.latents[0] - together.latents[2]).abs().max() > 0.1


def test_same_seed_same_sample_and_different_seed_differs(tiny_policy):
    a = sample(tiny_policy, ["a cat"], [11], SETTINGS)
    b = sample(tiny_policy, ["a cat"], [11], SETTINGS)
    c = sample(tiny_policy, ["a cat"], [12], SETTINGS)
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)


def test_recomputed_log_probs_equal_the_rollouts(tiny_policy):
    """DESIGN.md: with no update between sampling and training the ratio is 1 to 1e-6 (fp32)."""
    add_lora(tiny_policy.unet, rank=4, alpha=4.0)
    r = sample(tiny_policy, ["a cat", "a dog", "a horse", "a fish"], [1, 2, 3, 4], SETTINGS)
    advantages = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # random mixed (row, step) minibatches, as training draws them
        rows = torch.randperm(4, generator=g)[:2]
        steps = torch.randint(0, 6, (2,), generator=g)
        out = transition_log_prob(tiny_policy, transitions(r, rows, steps, advantages), SETTINGS)
        ratio = (out.log_prob - r.log_probs[rows, steps]).exp()
        torch.testing.assert_close(ratio, torch.ones(2), rtol=0, atol=1e-6)


def test_index_and_cat_round_trip(tiny_policy):
    r = sample(tiny_policy, ["a cat", "a dog", "a fish"], [1, 2, 3], SETTINGS)
    parts = [r.index(torch.tensor([0])), r.index(slice(1, 3))]
    back = Rollout.cat(parts)
    assert back.prompts == r.prompts and torch.equal(back.latents, r.latents)
    assert torch.equal(back.negative_embeds, r.negative_embeds)


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(42, 3, 5) == sample_seed(42, 3, 5)
    assert len({sample_seed(42, e, i) for e in range(5) for i in range(50)}) == 250


def test_shared_x_T_with_different_step_noise(tiny_policy):
    """SDPO's pairs: one x_T, step noise from each sample's own stream."""
    from diffalign.rollout import initial_noise

    seeds = [sample_seed(3, 0, 0), sample_seed(3, 0, 1)]
    x_T = initial_noise(seeds[:1], tiny_policy.latent_shape).expand(2, -1, -1, -1)
    pair = sample(tiny_policy, ["a cat", "a cat"], seeds, SETTINGS, x_T=x_T)
    assert torch.equal(pair.latents[0, 0], pair.latents[1, 0])
    assert (pair.latents[0, 1] - pair.latents[1, 1]).abs().max() > 0.1  # the first step's noise differs
    # sample 1's steps are its own: regenerated alone from the same x_T it is the same trajectory
    alone = sample(tiny_policy, ["a cat"], seeds[1:], SETTINGS, x_T=x_T[:1])
    torch.testing.assert_close(alone.latents[0], pair.latents[1], rtol=0, atol=2e-4)
    with pytest.raises(ValueError, match="x_T must have shape"):
        sample(tiny_policy, ["a cat"], seeds[:1], SETTINGS, x_T=x_T)


def test_deterministic_sampling_stores_no_log_probs(tiny_policy):
    r = sample(tiny_policy, ["a cat"], [1], StepSettings(num_inference_steps=3, guidance_scale=1.0, eta=0.0))
    assert r.log_probs is None and r.negative_embeds is None and r.latents.shape[1] == 4


def test_rollout_is_frozen_and_rewards_make_a_new_one(tiny_policy):
    r = sample(tiny_policy, ["a cat", "a dog"], [1, 2], SETTINGS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.rewards = torch.ones(2)
    scored = r.with_rewards(torch.tensor([0.5, 1.0]))
    assert r.rewards is None and scored.rewards.tolist() == [0.5, 1.0] and scored.latents is r.latents
    with pytest.raises(ValueError, match="rewards must have shape"):
        r.with_rewards(torch.ones(3))


def test_denoise_step_draws_and_scores_the_same_transition(tiny_policy):
    """The public step: drawing x_{t-1} from noise, then scoring it, gives the drawn step's log-prob and mean."""
    conditioning = encode(tiny_policy, ["a cat", "a dog"], SETTINGS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *tiny_policy.latent_shape, generator=g)
    t = torch.tensor([801, 401])
    with torch.no_grad():
        drawn = denoise_step(tiny_policy, x, t, conditioning, SETTINGS, noise=torch.randn(x.shape, generator=g))
        scored = denoise_step(tiny_policy, x, t, conditioning, SETTINGS, prev_sample=drawn.prev_sample)
    torch.testing.assert_close(scored.log_prob, drawn.log_prob)
    torch.testing.assert_close(scored.mean, drawn.mean)
    assert drawn.log_prob.shape == (2,)


def test_sample_batched_equals_one_batch(tiny_policy):
    prompts, seeds = ["a cat", "a dog", "a fish"], [4, 5, 6]
    whole = sample(tiny_policy, prompts, seeds, SETTINGS)
    parts = sample_batched(tiny_policy, prompts, seeds, SETTINGS, batch_size=2)
    assert parts.prompts == prompts and torch.equal(parts.seeds, whole.seeds)
    torch.testing.assert_close(parts.latents, whole.latents, rtol=0, atol=2e-4)


def test_kl_to_base_is_zero_without_training_and_the_closed_form_after(tiny_policy):
    """KL(π_θ ‖ π_base) per step = ‖μ_θ − μ_base‖² / 2σ² (mean over pixels), μ_base from the UNet with LoRA off."""
    add_lora(tiny_policy.unet, rank=4, alpha=4.0)
    r = sample(tiny_policy, ["a cat", "a dog"], [1, 2], SETTINGS)
    batch = transitions(r, torch.tensor([0, 1]), torch.tensor([0, 3]), torch.zeros(2))
    step = transition_log_prob(tiny_policy, batch, SETTINGS)
    assert kl_to_reference(tiny_policy, batch, step, SETTINGS).abs().max().item() == 0.0  # LoRA B starts at zero
    with torch.no_grad():
        for name, p in tiny_policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    step = transition_log_prob(tiny_policy, batch, SETTINGS)
    kl = kl_to_reference(tiny_policy, batch, step, SETTINGS)
    with torch.no_grad(), tiny_policy.reference():
        base = transition_log_prob(tiny_policy, batch, SETTINGS)
    by_hand = ((step.mean - base.mean) ** 2 / (2 * step.std**2)).mean(dim=(1, 2, 3))
    assert by_hand.min() > 0
    torch.testing.assert_close(kl, by_hand)
    kl.sum().backward()  # the gradient reaches the LoRA through μ_θ
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in tiny_policy.unet.named_parameters()
               if "lora_" in n)
