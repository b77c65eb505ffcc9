import math

import pytest
import torch

from diffalign.algorithms.ddpo import DDPOConfig, ppo_clip_loss


def test_loss_hand_values():
    log_prob = torch.tensor([0.0, math.log(1.5), math.log(0.5)])
    old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -8.0])
    loss, metrics = ppo_clip_loss(log_prob, old, adv, clip_range=0.2, adv_clip_max=5.0)
    # r = 1: −1;  r = 1.5, A = 1: max(−1.5, −1.2) = −1.2;  r = .5, A = −5 (clipped): max(2.5, 4.0) = 4.0
    assert loss.item() == pytest.approx((-1.0 - 1.2 + 4.0) / 3)
    assert metrics["policy/clipfrac"].item() == pytest.approx(2 / 3)
    expected_kl = ((1.5 - 1 - math.log(1.5)) + (0.5 - 1 - math.log(0.5))) / 3
    assert metrics["policy/approx_kl"].item() == pytest.approx(expected_kl)


def test_no_gradient_outside_the_clip_region_in_the_improving_direction():
    log_prob = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, _ = ppo_clip_loss(log_prob, torch.zeros(4), adv, clip_range=0.2, adv_clip_max=5.0)
    loss.backward()
    # ratio above 1+ε with A > 0, or below 1−ε with A < 0: clipped, no gradient; otherwise −A r / b
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 0.0, 1.5 / 4, -0.5 / 4]))


def test_on_policy_gradient_is_the_score_function():
    log_prob = torch.zeros(2, requires_grad=True)
    loss, metrics = ppo_clip_loss(log_prob, torch.zeros(2), torch.tensor([2.0, -1.0]), 1e-4, 5.0)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-1.0, 0.5]))
    assert metrics["policy/clipfrac"].item() == 0 and metrics["policy/approx_kl"].item() == 0


def test_config_validation():
    assert DDPOConfig().validate() == []
    assert len(DDPOConfig(clip_range=0, adv_clip_max=-1).validate()) == 2


def test_weights_scale_each_transitions_term():
    log_prob = torch.tensor([0.0, 0.0])
    adv = torch.tensor([1.0, -2.0])
    plain, _ = ppo_clip_loss(log_prob, torch.zeros(2), adv, 0.2, 5.0)
    weighted, _ = ppo_clip_loss(log_prob, torch.zeros(2), adv, 0.2, 5.0, weights=torch.tensor([3.0, 0.5]))
    # terms at r = 1 are −A: (−1, 2); weighted (−3, 1) → mean −1 against the plain mean 0.5
    assert plain.item() == pytest.approx(0.5) and weighted.item() == pytest.approx(-1.0)


def test_min_timestep_trains_only_the_noisier_steps(tiny_policy):
    from diffalign.algorithms.base import Minibatching, shuffled_transitions
    from diffalign.rollout import StepSettings, sample

    rollout = sample(tiny_policy, ["a cat", "a dog"], [1, 2], StepSettings(num_inference_steps=5, guidance_scale=1.0))
    # timesteps 801, 601, 401, 201, 1: t >= 300 leaves three; half of them (int(1.5) = 1) per sample
    groups = list(shuffled_transitions(rollout, torch.zeros(2), Minibatching(2, 1),
                                       lambda k: torch.Generator().manual_seed(k), 1, 0.5, min_timestep=300))
    assert len(groups) == 1 and len(groups[0]) == 1 and (groups[0][0].t >= 300).all()
    every = list(shuffled_transitions(rollout, torch.zeros(2), Minibatching(2, 1),
                                      lambda k: torch.Generator().manual_seed(k), 1, 1.0, min_timestep=300))
    assert sorted(set(torch.cat([b.t for b in every[0]]).tolist())) == [401, 601, 801]
    with pytest.raises(ValueError, match="no denoising step has t >= min_timestep"):
        list(shuffled_transitions(rollout, torch.zeros(2), Minibatching(2, 1),
                                  lambda k: torch.Generator().manual_seed(k), 1, 1.0, min_timestep=900))
