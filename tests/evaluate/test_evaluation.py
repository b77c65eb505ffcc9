"""The evaluation module: diversity on hand values, judges with and without a strict flag, KL to the base model."""

import math

import pytest
import torch

from diffalign.evaluate import EvalSet, RunSummary, diversity, evaluate_policy, kl_to_base
from diffalign.models import add_lora
from diffalign.rewards import get
from diffalign.rollout import StepSettings, sample

SETTINGS = StepSettings(num_inference_steps=4, guidance_scale=3.0, eta=1.0)


def test_diversity_hand_values():
    black, white, grey = torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.full((3, 2, 2), 0.5)
    images = torch.stack([black, white, grey, black, black, white])
    # "a": pairs (black, white) 1, (black, grey) .5, (white, grey) .5 → 2/3; "b": (black, black) 0; "c" alone: skipped
    value = diversity(images, ["a", "a", "a", "b", "b", "c"])
    assert value == pytest.approx((2 / 3 + 0) / 2)
    assert diversity(images[:2], ["a", "b"]) is None


def test_evaluate_policy_reports_means_strict_accuracy_and_diversity(tiny_policy):
    sets = [EvalSet("train", ["a red circle", "two blue squares"], [1, 2]),
            EvalSet("diversity", ["a red circle"] * 3, [3, 4, 5])]
    judges = {"reward": get("shapes"), "gold": get("brightness")}
    result = evaluate_policy(tiny_policy, sets, SETTINGS, judges, batch_size=2, diversity_sets=["diversity"])
    assert set(result.metrics) == {"train_reward_mean", "train_strict_accuracy", "train_gold_mean",
                                   "diversity_reward_mean", "diversity_strict_accuracy", "diversity_gold_mean",
                                   "diversity_diversity"}
    images = result.rollouts["train"].images
    brightness = get("brightness")(images, sets[0].prompts).mean().item()
    assert result.metrics["train_gold_mean"] == pytest.approx(brightness)
    again = evaluate_policy(tiny_policy, sets[:1], SETTINGS, judges, batch_size=1)
    assert again.metrics["train_gold_mean"] == pytest.approx(brightness, abs=1e-5)  # fixed seeds, any batch size


def test_kl_to_base_is_zero_for_an_untrained_adapter_and_positive_after(tiny_policy):
    add_lora(tiny_policy.unet, rank=4, alpha=4.0)
    rollout = sample(tiny_policy, ["a cat", "a dog"], [1, 2], SETTINGS)
    assert kl_to_base(tiny_policy, rollout, SETTINGS).tolist() == [0.0, 0.0]
    with torch.no_grad():
        for name, p in tiny_policy.unet.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    kl = kl_to_base(tiny_policy, rollout, SETTINGS)
    assert kl.shape == (2,) and (kl > 0).all() and all(math.isfinite(v) for v in kl.tolist())
    # a subset of steps is scaled to the chain: all steps give the sum, the steps one at a time average to it
    torch.testing.assert_close(kl_to_base(tiny_policy, rollout, SETTINGS, steps=torch.arange(4)), kl)
    singles = torch.stack([kl_to_base(tiny_policy, rollout, SETTINGS, steps=torch.tensor([j])) for j in range(4)])
    torch.testing.assert_close(singles.mean(dim=0), kl)
    with pytest.raises(ValueError, match="η > 0"):
        kl_to_base(tiny_policy, rollout, StepSettings(num_inference_steps=4, eta=0.0))


def test_full_fine_tuning_needs_a_reference_copy(tiny_policy):
    with pytest.raises(ValueError, match="keep_reference"):
        with tiny_policy.reference():
            pass
    tiny_policy.keep_reference()
    with torch.no_grad():
        next(tiny_policy.unet.parameters()).add_(1.0)
    rollout = sample(tiny_policy, ["a cat"], [1], SETTINGS)
    assert kl_to_base(tiny_policy, rollout, SETTINGS).item() > 0


def test_run_summary_round_trip(tmp_path):
    summary = RunSummary(preset="p", algorithm="ddpo", reward="shapes", model="shapes", epochs=3, global_step=3,
                         final={"heldout_strict_accuracy": 0.25}, base={"heldout_strict_accuracy": 0.2})
    summary.write(tmp_path / "summary.json")
    assert RunSummary.read(tmp_path / "summary.json") == summary
    assert "base" not in RunSummary("p", "ddpo", "r", "m", 1, 1).to_dict()
