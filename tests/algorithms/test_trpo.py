"""TRPO: β's rule on hand values, conjugate gradient, Fisher-vector products against finite differences, the
trust-region step on the tiny model, and runs through the loop (penalty mode resumes bit-identically with β)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from diffalign import cli
from diffalign.algorithms import ALGORITHMS
from diffalign.algorithms.base import Minibatching
from diffalign.algorithms.trpo import (TRPO, TRPOConfig, adapt_beta, conjugate_gradient, fisher_vector_product,
                                       flat_grad, kl_gradient, set_flat, surrogate)
from diffalign.config import preset
from diffalign.models import add_lora
from diffalign.rollout import StepSettings, transition_log_prob
from diffalign.samplers import gaussian_kl

SETTINGS = StepSettings(num_inference_steps=3, guidance_scale=3.0, eta=1.0)


def test_beta_doubles_and_halves_around_the_target():
    # target 1e-3: above 1.5e-3 doubles, below 1e-3/1.5 = 6.67e-4 halves, in between stays
    assert adapt_beta(1.0, 2e-3, 1e-3) == 2.0
    assert adapt_beta(1.0, 5e-4, 1e-3) == 0.5
    assert adapt_beta(1.0, 1e-3, 1e-3) == 1.0
    assert adapt_beta(1.0, 1.5e-3, 1e-3) == 1.0 and adapt_beta(1.0, 1e-3 / 1.5, 1e-3) == 1.0
    assert adapt_beta(0.25, 0.0, 1e-3) == 0.125
    assert adapt_beta(1e-8, 0.0, 1e-3) == 1e-8  # the floor: halving can never reach 0


def test_surrogate_hand_values():
    log_prob = torch.tensor([math.log(2.0), 0.0, math.log(0.5)])
    advantages = torch.tensor([1.0, -2.0, 8.0])
    # (1·2 − 2·1 + 5·0.5) / 3: the last advantage is clipped to 5
    assert surrogate(log_prob, torch.zeros(3), advantages, 5.0).item() == pytest.approx(2.5 / 3)


def test_conjugate_gradient_solves_a_small_spd_system():
    a = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=3)  # exact in n = 3 iterations
    torch.testing.assert_close(x, torch.linalg.solve(a, b))
    assert torch.equal(conjugate_gradient(lambda v: a @ v, torch.zeros(3, dtype=torch.float64), 3), torch.zeros(3))


def _lora_policy(policy, rank=4, target_modules=("to_q", "to_k", "to_v", "to_out.0")):
    """The policy with a LoRA whose B is random (at B = 0 the A-directions have no curvature), seeded."""
    torch.manual_seed(0)  # peft draws A from the global generator
    add_lora(policy.unet, rank=rank, alpha=float(rank), target_modules=target_modules)
    generator = torch.Generator().manual_seed(0)
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return params


def _group(method, policy, advantages=None, n=4):
    rollout = method.collect(policy, ["a cat", "a dog", "a cat", "a dog"][:n], list(range(n)))
    targets = torch.tensor([1.0, -1.0, 0.5, -0.5])[:n] if advantages is None else advantages
    (group,) = method.minibatches(rollout, targets, Minibatching(n, 1), lambda k: torch.Generator().manual_seed(k))
    return group


def test_fisher_vector_products_equal_a_finite_difference_hessian_vector_product(tiny_policy):
    params = _lora_policy(tiny_policy, rank=1, target_modules=("to_q",))
    assert sum(p.numel() for p in params) <= 1024  # a small parameter vector
    method = TRPO(TRPOConfig(), SETTINGS)
    batch = _group(method, tiny_policy)[0]
    with torch.no_grad():
        mean_0 = transition_log_prob(tiny_policy, batch, SETTINGS).mean

    def kl() -> torch.Tensor:  # the mean KL to the policy at θ_0, as the trust region measures it
        step = transition_log_prob(tiny_policy, batch, SETTINGS)
        return gaussian_kl(mean_0, step.mean, step.std).mean()

    theta_0 = torch.cat([p.detach().reshape(-1) for p in params])
    v = torch.randn(theta_0.shape, generator=torch.Generator().manual_seed(1))
    fv = fisher_vector_product(kl_gradient(tiny_policy, batch, SETTINGS, True, params), params, v)
    eps = 3e-3  # central differences: O(ε²) truncation against fp32 rounding (5e-4 relative here)
    gradients = []
    for sign in (1, -1):
        set_flat(params, theta_0 + sign * eps * v)
        gradients.append(flat_grad(kl(), params))
    set_flat(params, theta_0)
    finite_difference = (gradients[0] - gradients[1]) / (2 * eps)
    assert fv.norm() > 0 and v @ fv > 0  # positive curvature along v
    assert ((fv - finite_difference).norm() / fv.norm()).item() < 5e-3
    torch.testing.assert_close(fv, finite_difference, rtol=1e-2, atol=1e-3 * fv.abs().max().item())


def test_the_accepted_step_stays_in_the_trust_region_and_improves_the_surrogate(tiny_policy):
    params = _lora_policy(tiny_policy)
    config = TRPOConfig(max_kl=1e-5)
    method = TRPO(config, SETTINGS)
    group = _group(method, tiny_policy)
    before_theta = torch.cat([p.detach().reshape(-1) for p in params])
    with torch.no_grad():
        before = [transition_log_prob(tiny_policy, b, SETTINGS) for b in group]
    metrics = method.update(tiny_policy, params, group, lambda x: x)
    assert metrics["trpo/accepted"] == 1.0
    with torch.no_grad():
        after = [transition_log_prob(tiny_policy, b, SETTINGS) for b in group]
    # measured again here, independently of the method's own bookkeeping
    kl = torch.stack([gaussian_kl(s0.mean, s1.mean, s1.std).mean() for s0, s1 in zip(before, after)]).mean()
    gain = torch.stack([surrogate(s1.log_prob, b.log_prob_old, b.advantages, 5.0)
                        - surrogate(s0.log_prob, b.log_prob_old, b.advantages, 5.0)
                        for s0, s1, b in zip(before, after, group)]).mean()
    assert 0 < kl.item() <= config.max_kl and gain.item() > 0
    assert metrics["trpo/step_kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert metrics["trpo/surrogate_gain"] == pytest.approx(gain.item(), rel=1e-3)
    moved = torch.cat([p.detach().reshape(-1) for p in params]) - before_theta
    assert moved.norm().item() == pytest.approx(metrics["trpo/step_norm"], rel=1e-4)
    assert metrics["trpo/step_kl"] > 0.1 * config.max_kl  # the quadratic model sized the step: few backtracks


def test_no_signal_means_no_step(tiny_policy):
    params = _lora_policy(tiny_policy)
    method = TRPO(TRPOConfig(), SETTINGS)
    group = _group(method, tiny_policy, advantages=torch.zeros(4))
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    metrics = method.update(tiny_policy, params, group, lambda x: x)
    assert metrics["trpo/accepted"] == 0.0 and metrics["trpo/step_kl"] == 0.0
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), theta)
    assert TRPO(TRPOConfig(mode="penalty"), SETTINGS).update(tiny_policy, params, group, lambda x: x) is None


def test_registered_with_presets_and_validation():
    assert "trpo" in ALGORITHMS
    assert preset("trpo-tiny").algorithm == "trpo" and preset("trpo-shapes").validate() == []
    errors = TRPOConfig(max_kl=0, backtrack_ratio=1.0, fisher_fraction=0.0, mode="natural").validate(
        StepSettings(eta=0.0))
    assert errors == ["method.max_kl must be > 0, got 0",
                      "method.backtrack_ratio must be in (0, 1), got 1.0",
                      "method.fisher_fraction must be in (0, 1], got 0.0",
                      "method.mode must be 'trust_region' or 'penalty', got 'natural'",
                      "sample.eta must be > 0 for trpo (its log-probs and KL need a stochastic sampler), got 0.0"]


def _train(run, *extra):
    cli.main(["train", "--algorithm", "trpo", "--preset", "trpo-tiny", "--run-dir", str(run), "--log-with", "none",
              "--sample.num-inference-steps", "3", "--eval.samples", "4", *extra])
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_trust_region_run_from_the_command_line(tmp_path):
    records = _train(tmp_path / "run", "--epochs", "2")
    max_kl = TRPOConfig().max_kl
    for r in records:
        assert 0 <= r["trpo/step_kl"] <= max_kl and r["trpo/backtracks"] >= 0
        assert {"policy/approx_kl", "policy/grad_norm", "kl/to_base", "trpo/step_norm"} <= set(r)
    assert any(r["trpo/accepted"] > 0 for r in records) and records[-1]["kl/to_base"] > 0
    checkpoint = tmp_path / "run" / "checkpoints" / "2"
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"] == {}  # the method set the weights
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in load_file(checkpoint / "trainable.safetensors").items())


def test_penalty_mode_resumes_bit_identically_with_beta(tmp_path):
    full = _train(tmp_path / "full", "--epochs", "3", "--method.mode", "penalty")
    _train(tmp_path / "part", "--epochs", "1", "--method.mode", "penalty")
    again = _train(tmp_path / "part", "--epochs", "3", "--method.mode", "penalty", "--resume", str(tmp_path / "part"))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(r) for r in full] == [strip(r) for r in again]
    assert all(r["trpo/step_kl"] > 0 for r in full) and len({r["trpo/beta"] for r in full}) > 1
    states = [json.loads((tmp_path / run / "checkpoints/3/trainer_state.json").read_text()) for run in ("full", "part")]
    beta = states[0]["algorithm"]["beta"]
    assert beta == states[1]["algorithm"]["beta"] != TRPOConfig().init_beta
    assert math.log2(beta).is_integer()  # only ever doubled or halved
    a, b = (load_file(tmp_path / name / "checkpoints/3/trainable.safetensors") for name in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
