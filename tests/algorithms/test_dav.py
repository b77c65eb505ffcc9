"""DAV: the search weights on hand values, the E-step against plain sampling, and an E-step + M-step run."""

import json

import pytest
import torch

from diffalign.algorithms.dav import Dav, DavConfig, search_log_weights
from diffalign.config import preset, replace
from diffalign.models import add_lora
from diffalign.rewards import get
from diffalign.rollout import StepSettings, sample
from diffalign.train.loop import train

SETTINGS = StepSettings(num_inference_steps=4, guidance_scale=1.0, eta=1.0)


def test_search_weights_on_hand_values_with_a_negative_reward():
    rewards = torch.tensor([1.0, -2.0])
    log_p, log_q = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    weights = search_log_weights(rewards, log_p, log_q, remaining_steps=2, gamma=0.9, alpha=0.5)
    # 0.9² / 0.5 = 1.62: [1.62 + 0.5, −3.24 − 1]
    torch.testing.assert_close(weights, torch.tensor([2.12, -4.24]))
    # the better (less negative) reward wins however negative both are
    both_negative = search_log_weights(torch.tensor([-5.0, -6.0]), torch.zeros(2), torch.zeros(2), 1, 0.9, 0.005)
    assert both_negative.argmax() == 0
    torch.testing.assert_close(search_log_weights(torch.tensor([float("nan")]), torch.zeros(1), torch.zeros(1),
                                                  1, 0.9, 1.0), torch.tensor([0.0]))


def test_one_child_without_shift_is_plain_sampling(tiny_policy):
    add_lora(tiny_policy.unet, rank=2, alpha=2.0)
    method = Dav(DavConfig(children=1), SETTINGS, get("brightness"))
    rollout = method.collect(tiny_policy, ["a cat", "a dog"], [11, 12])
    plain = sample(tiny_policy, ["a cat", "a dog"], [11, 12], SETTINGS)
    assert torch.equal(rollout.latents, plain.latents)
    torch.testing.assert_close(rollout.log_probs, plain.log_probs)


def test_search_beats_plain_sampling_on_its_reward(tiny_policy):
    add_lora(tiny_policy.unet, rank=2, alpha=2.0)
    reward = get("brightness")
    plain = sample(tiny_policy, ["a cat"] * 4, [1, 2, 3, 4], SETTINGS)
    searched = Dav(DavConfig(children=6, alpha=0.001), SETTINGS, reward).collect(tiny_policy, ["a cat"] * 4,
                                                                                 [1, 2, 3, 4])
    assert reward(searched.images, ["a cat"] * 4).mean() > reward(plain.images, ["a cat"] * 4).mean()


def test_value_gradients_need_a_differentiable_reward():
    with pytest.raises(ValueError, match="dav.*'jpeg_compressibility', which is not differentiable"):
        Dav(DavConfig(value_gradient=True), SETTINGS, get("jpeg_compressibility"))
    config = replace(preset("dav-tiny"), **{"method.value_gradient": True})
    assert any("jpeg_compressibility" in e and "dav" in e for e in config.validate())
    assert any("sample.eta must be > 0" in e for e in replace(config, **{"sample.eta": 0.0}).validate())


@pytest.mark.parametrize("hill_climbing, value_gradient", [(True, True), (False, False)])
def test_e_step_and_m_step_run(tmp_path, hill_climbing, value_gradient):
    config = replace(preset("dav-tiny"), run_dir=str(tmp_path / "run"), epochs=1, log_with="none",
                     **{"sample.num_inference_steps": 3, "sample.batch_size_per_device": 2,
                        "sample.num_batches_per_epoch": 1, "train.batch_size_per_device": 2,
                        "reward.name": "brightness", "eval.samples": 2, "eval.diversity_prompts": 0,
                        "method.hill_climbing": hill_climbing, "method.value_gradient": value_gradient,
                        "method.improve_steps": 2})
    run = train(config.check()).run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["global_step"] == 2  # improve_steps passes, one optimizer step each
    assert records[0]["dav/nll"] == records[0]["dav/nll"] and records[0]["dav/anchor_mse"] >= 0
