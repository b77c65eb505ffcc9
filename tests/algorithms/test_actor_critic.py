"""The KL-regularised actor-critic: GAE and step rewards on hand values, the critic learning a fixed batch, per-step
advantages, and a run from the command line that resumes bit-identically with its value network."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign import cli
from diffalign.algorithms import ALGORITHMS
from diffalign.algorithms.actor_critic import (ActorCritic, ActorCriticConfig, ValueNetwork, explained_variance, gae,
                                               step_rewards)
from diffalign.algorithms.advantages import AdvantageConfig
from diffalign.algorithms.base import Minibatching
from diffalign.config import preset
from diffalign.models import add_lora
from diffalign.rollout import StepSettings

SETTINGS = StepSettings(num_inference_steps=3, guidance_scale=3.0, eta=1.0)


def test_gae_hand_values():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.9]])
    # γ = λ = 1: A_j = G_j − V_j with G_j = 1 at every step
    advantages, returns = gae(rewards, values, 1.0, 1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.8, 0.1]]))
    torch.testing.assert_close(returns, torch.ones(1, 3))
    # γ = λ = 0.5: δ = (0 + .5·.2 − .5, 0 + .5·.9 − .2, 1 − .9) = (−.4, .25, .1);
    # A_2 = .1, A_1 = .25 + .25·.1 = .275, A_0 = −.4 + .25·.275 = −.33125
    advantages, returns = gae(rewards, values, 0.5, 0.5)
    torch.testing.assert_close(advantages, torch.tensor([[-0.33125, 0.275, 0.1]]))
    torch.testing.assert_close(returns, torch.tensor([[0.16875, 0.475, 1.0]]))


def test_step_rewards_pay_the_kl_at_every_step_and_the_reward_at_the_end():
    rewards = step_rewards(torch.tensor([1.0, 2.0]), torch.tensor([[0.1, 0.2], [0.3, 0.4]]), kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.9], [-0.15, 1.8]]))


def test_explained_variance():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(target, target).item() == 1.0
    assert explained_variance(torch.full((4,), 2.5), target).item() == 0.0
    assert explained_variance(target, torch.ones(4)).item() == 0.0  # constant targets: defined as 0


def test_value_network_fits_any_latent_size_and_text_width_and_starts_at_zero():
    value = ValueNetwork(width=8)
    for size, width in [(8, 32), (16, 768)]:
        out = value(torch.randn(3, 4, size, size), torch.tensor([999, 500, 1]), torch.randn(3, 77, width))
        assert out.shape == (3,) and torch.equal(out, torch.zeros(3))
    with pytest.raises(ValueError, match="built for 4 latent channels"):
        value(torch.randn(1, 16, 8, 8), torch.tensor([1]), torch.randn(1, 77, 32))


def _trained_lora(policy):
    """The policy with a LoRA whose B is random, so it differs from the base model (seeded)."""
    torch.manual_seed(0)  # peft draws A from the global generator
    add_lora(policy.unet, rank=4, alpha=4.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def test_the_critic_learns_a_fixed_batch_and_advantages_differ_across_steps(tiny_policy):
    _trained_lora(tiny_policy)
    torch.manual_seed(0)
    method = ActorCritic(ActorCriticConfig(kl_coef=0.5, advantages=AdvantageConfig(per_prompt=False)), SETTINGS)
    prompts, seeds = ["a cat", "a dog", "a cat", "a dog"], [1, 2, 3, 4]
    rewards = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rollout = method.collect(tiny_policy, prompts, seeds)
    targets = method.targets(rewards, prompts, torch.Generator().manual_seed(0))
    torch.testing.assert_close(targets, (rewards - rewards.mean()) / rewards.std(unbiased=False), atol=1e-6, rtol=0)
    kl = method._chain_kl.copy()
    # V ≡ 0 at first: the advantages are the returns, R − α Σ_{k≥j} KL_k, which differ only by the KL
    advantages, returns = method.advantages_and_returns(rollout, targets)
    chain = torch.stack([kl[s] for s in rollout.seeds.tolist()])
    expected = targets[:, None] - 0.5 * chain.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(returns, expected)
    torch.testing.assert_close(advantages, expected)
    assert (chain > 0).all()

    method._chain_kl.update(kl)
    (group,) = method.minibatches(rollout, targets, Minibatching(4, 1), lambda k: torch.Generator().manual_seed(k))
    optimizer = torch.optim.Adam(method.modules["value"].module.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        total = 0.0
        for batch in group:
            loss, metrics = method.loss(tiny_policy, batch)
            (loss / len(group)).backward()
            total += metrics["value/loss"].item() / len(group)
        optimizer.step()
        optimizer.zero_grad()
        tiny_policy.unet.zero_grad()
        losses.append(total)
    assert losses[-1] < 0.2 * losses[0]
    # the trained critic's per-step values make the steps of each sample differ
    method._chain_kl.update(kl)
    advantages, new_returns = method.advantages_and_returns(rollout, targets)
    torch.testing.assert_close(new_returns, returns)  # λ = 1: the returns do not depend on V
    values = method.values(rollout)
    assert (values.std(dim=1) > 1e-3).all()
    torch.testing.assert_close(advantages, returns - values)


def test_missing_kl_is_a_clear_error(tiny_policy):
    method = ActorCritic(ActorCriticConfig(kl_coef=0.1), SETTINGS)
    add_lora(tiny_policy.unet, rank=4, alpha=4.0)
    rollout = method.collect(tiny_policy, ["a cat"], [7])
    method._chain_kl.clear()
    with pytest.raises(ValueError, match="no KL to the base model for 1 samples"):
        method.advantages_and_returns(rollout, torch.zeros(1))


def test_registered_with_presets_and_validation():
    assert "actor_critic" in ALGORITHMS
    assert preset("actor-critic-tiny").algorithm == "actor_critic" and preset("actor-critic-shapes").validate() == []
    errors = ActorCriticConfig(kl_coef=-1, gae_lambda=1.5).validate(StepSettings(eta=0.0))
    assert errors == ["method.kl_coef must be >= 0, got -1", "method.gae_lambda must be in [0, 1], got 1.5",
                      "sample.eta must be > 0 for actor_critic (its log-probs and KL need a stochastic sampler), "
                      "got 0.0"]


def _train(run, *extra):
    cli.main(["train", "--algorithm", "actor_critic", "--preset", "actor-critic-tiny", "--run-dir", str(run),
              "--log-with", "none", "--sample.num-inference-steps", "3", "--eval.samples", "4", *extra])
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_from_the_command_line_resumes_bit_identically_with_the_value_network(tmp_path):
    full = _train(tmp_path / "full", "--epochs", "2")
    for r in full:
        assert {"policy/approx_kl", "policy/clipfrac", "kl/to_base", "kl/to_base_step", "value/loss",
                "value/explained_variance"} <= set(r)
    assert full[-1]["kl/to_base"] > 0
    _train(tmp_path / "part", "--epochs", "1")
    again = _train(tmp_path / "part", "--epochs", "2", "--resume", str(tmp_path / "part"))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(r) for r in full] == [strip(r) for r in again]
    for name in ("trainable.safetensors", "modules/value.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoints/2" / name) for run in ("full", "part"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    value = load_file(tmp_path / "full/checkpoints/2/modules/value.safetensors")
    assert value["head.2.weight"].abs().max() > 0  # the critic trained (its last layer starts at zero)
    optimizer = torch.load(tmp_path / "full/checkpoints/2/optimizer.pt", weights_only=True)
    assert [group["lr"] for group in optimizer["param_groups"]] == [1e-3, ActorCriticConfig().value_learning_rate]
