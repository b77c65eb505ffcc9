"""REINFORCE: the loss on hand values, the KL-to-base term, and a run from the command line."""

import json

import pytest
import torch

from diffalign import cli
from diffalign.algorithms import ALGORITHMS
from diffalign.algorithms.reinforce import Reinforce, ReinforceConfig, reinforce_loss
from diffalign.config import preset
from diffalign.models import add_lora
from diffalign.rollout import StepSettings, sample, transitions


def test_loss_hand_values():
    log_prob = torch.tensor([-1.0, -2.0, 0.5], requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 8.0])
    loss, metrics = reinforce_loss(log_prob, adv, adv_clip_max=5.0)
    # −(1·(−1) + (−.5)(−2) + 5·.5) / 3 = −(−1 + 1 + 2.5) / 3 (the third advantage is clipped to 5)
    assert loss.item() == pytest.approx(-2.5 / 3)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -torch.tensor([1.0, -0.5, 5.0]) / 3)
    assert metrics["policy/log_prob_mean"].item() == pytest.approx(-2.5 / 3)


def test_kl_term_adds_beta_times_the_mean_kl():
    log_prob = torch.zeros(2)
    kl = torch.tensor([0.2, 0.4])
    loss, metrics = reinforce_loss(log_prob, torch.ones(2), 5.0, kl=kl, kl_coef=0.5)
    assert loss.item() == pytest.approx(0.5 * 0.3)
    assert metrics["kl/to_base_step"].item() == pytest.approx(0.3)


def test_kl_to_base_is_zero_with_an_untrained_adapter(tiny_policy):
    settings = StepSettings(num_inference_steps=4, guidance_scale=3.0, eta=1.0)
    add_lora(tiny_policy.unet, rank=4, alpha=4.0)
    method = Reinforce(ReinforceConfig(kl_coef=1.0), settings)
    rollout = sample(tiny_policy, ["a cat", "a dog"], [1, 2], settings)
    batch = transitions(rollout, torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([1.0, -1.0]))
    loss, metrics = method.loss(tiny_policy, batch)
    assert metrics["kl/to_base_step"].item() == 0.0
    # on-policy, so the loss is the advantage-weighted log-probs alone
    expected = -(batch.advantages * rollout.log_probs[[0, 1], [1, 2]]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_registered_with_its_presets_and_a_sampler_rule():
    assert {"ddpo", "reinforce"} <= set(ALGORITHMS)
    assert preset("reinforce-tiny").algorithm == "reinforce" and preset("reinforce-shapes").validate() == []
    errors = ReinforceConfig().validate(StepSettings(eta=0.0))
    assert errors == ["sample.eta must be > 0 for reinforce (its log-probs need a stochastic sampler), got 0.0"]


def test_cli_trains_reinforce_into_the_same_run_folder(tmp_path):
    run = tmp_path / "run"
    cli.main(["train", "--algorithm", "reinforce", "--preset", "reinforce-tiny", "--epochs", "2",
              "--run-dir", str(run), "--log-with", "none", "--sample.num-inference-steps", "3",
              "--method.kl-coef", "0.1"])
    for name in ["config.json", "metrics.jsonl", "summary.json", "report.html", "samples/before.png",
                 "samples/after.png", "checkpoints/2/lora/pytorch_lora_weights.safetensors"]:
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["algorithm"] == "reinforce" and config["method"]["kl_coef"] == 0.1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 8 samples per epoch in micro-batches of 4, one per optimizer step
    assert [r["global_step"] for r in records] == [2, 4] and all(r["kl/to_base_step"] >= 0 for r in records)
    assert records[1]["kl/to_base_step"] > 0  # the first update moved the policy off the base


def test_switching_a_preset_to_reinforce_keeps_everything_but_the_method(capsys):
    cli.main(["config", "show", "--preset", "ddpo-shapes", "--algorithm", "reinforce"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["algorithm"] == "reinforce" and shown["reward"]["name"] == "shapes"
    assert shown["method"] == json.loads(json.dumps(__import__("dataclasses").asdict(ReinforceConfig())))
