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
