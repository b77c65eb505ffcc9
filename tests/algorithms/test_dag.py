"""DAG / DAG-KL: P_B and detailed balance on an exact Gaussian chain, leave-one-out advantages, gradients into the
flow network and the LoRA, a resumable run."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from diffalign.algorithms.base import Minibatching
from diffalign.algorithms.dag import Dag, DagConfig, FlowNetwork, detailed_balance_residual, leave_one_out_advantages
from diffalign.config import preset, replace
from diffalign.models import add_lora
from diffalign.rewards import get
from diffalign.samplers import backward_log_prob, gaussian_log_prob
from diffalign.train.loop import train

SETTINGS_KW = dict(num_inference_steps=3, guidance_scale=2.0, eta=1.0)


def test_backward_kernel_on_hand_values():
    alphas = torch.tensor([0.9, 0.8, 0.5])
    x_prev, x_t = torch.tensor([[[[1.0]]]]), torch.tensor([[[[0.5]]]])
    # ratio 0.5/0.8 = 0.625: N(0.5; √0.625 · 1, 0.375)
    mean, var = math.sqrt(0.625), 0.375
    expected = -(0.5 - mean) ** 2 / (2 * var) - 0.5 * math.log(var) - 0.5 * math.log(2 * math.pi)
    got = backward_log_prob(x_t, x_prev, 2, 1, alphas, final_alpha_cumprod=1.0, reduction="sum")
    torch.testing.assert_close(got, torch.tensor([expected]))


def test_detailed_balance_holds_exactly_on_a_gaussian_chain():
    """Data x_0 ~ N(0, s²): every marginal is Gaussian, P_F the exact posterior q(x_prev | x_t) and F the marginal
    density; then F(x_t) P_F(x_prev | x_t) = F(x_prev) P_B(x_t | x_prev) for any pair of states."""
    alphas = torch.linspace(0.99, 0.3, 1000, dtype=torch.float64).float()
    t, t_prev, s2 = 700, 400, 0.25
    x_t, x_prev = torch.randn(5, 2, 3, 3) * 0.8, torch.randn(5, 2, 3, 3) * 0.7

    def marginal_var(step):
        return alphas[step] * s2 + 1 - alphas[step]

    a2 = alphas[t] / alphas[t_prev]
    precision = 1 / marginal_var(t_prev) + a2 / (1 - a2)
    post_mean = (a2.sqrt() * x_t / (1 - a2)) / precision
    one = torch.ones(5, 1, 1, 1)

    def log_normal(x, mean, var):
        return gaussian_log_prob(x, mean, (var * one).sqrt(), "sum")

    delta = detailed_balance_residual(
        log_normal(x_t, 0.0, marginal_var(t)), log_normal(x_prev, post_mean, 1 / precision),
        backward_log_prob(x_t, x_prev, t, t_prev, alphas, final_alpha_cumprod=1.0, reduction="sum"),
        log_normal(x_prev, 0.0, marginal_var(t_prev)))
    torch.testing.assert_close(delta, torch.zeros(5), atol=1e-4, rtol=0)
    wrong = log_normal(x_prev, post_mean * 1.1, 1 / precision)  # a policy off the exact posterior breaks it
    assert detailed_balance_residual(log_normal(x_t, 0.0, marginal_var(t)), wrong, backward_log_prob(
        x_t, x_prev, t, t_prev, alphas, final_alpha_cumprod=1.0, reduction="sum"),
        log_normal(x_prev, 0.0, marginal_var(t_prev))).abs().max() > 1e-2


def test_leave_one_out_advantages_on_hand_values():
    # baselines (6 − ρ_i)/2 = [2.5, 2, 1.5]; centred [−1.5, 0, 1.5]; variances [(4.5 − 2.25)/2, 4.5/2, 1.125]
    advantages = leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0]), adv_clip_max=5.0)
    torch.testing.assert_close(advantages, torch.tensor([-1.5 / math.sqrt(1.125), 0.0, 1.5 / math.sqrt(1.125)]))
    # centred [−15, −15, 30], variances [562.5, 562.5, 225]: [−15/√562.5, −15/√562.5, 2 → clipped to 1]
    torch.testing.assert_close(leave_one_out_advantages(torch.tensor([0.0, 0.0, 30.0]), 1.0),
                               torch.tensor([-15 / math.sqrt(562.5), -15 / math.sqrt(562.5), 1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(torch.tensor([1.0]), 5.0)


def test_flow_network_sizes_itself_to_the_latents():
    for size in (8, 16, 64):
        flow = FlowNetwork(4, size, 32, channels=(32, 64, 64))
        out = flow(torch.randn(3, 4, size, size), torch.tensor([1, 500, 999]), torch.randn(3, 7, 32))
        assert out.shape == (3,) and torch.isfinite(out).all()


@pytest.mark.parametrize("klpf", [-1.0, 1.0])
def test_gradients_reach_the_flow_network_and_the_lora(tiny_policy, klpf):
    from diffalign.rollout import StepSettings

    settings = StepSettings(**SETTINGS_KW)
    add_lora(tiny_policy.unet, rank=2, alpha=2.0)
    with torch.no_grad():  # LoRA B away from zero so every adapter weight has a gradient
        for name, p in tiny_policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    method = Dag(DagConfig(klpf=klpf, reward_exp=10.0, anneal_epochs=0, flow_channels=(32, 64)), settings,
                 get("brightness"))
    method.attach(tiny_policy)
    rollout = method.collect(tiny_policy, ["a cat", "a dog", "a cow"], [1, 2, 3])
    targets = method.targets(get("brightness")(rollout.images, rollout.prompts), rollout.prompts, None)
    assert method.beta == 10.0
    group = next(iter(method.minibatches(rollout, targets, Minibatching(3, 1), lambda k: torch.Generator())))
    loss, metrics = method.loss(tiny_policy, group[0])
    loss.backward()
    flow_grads = [p.grad for p in method.modules["flow"].module.parameters()]
    lora_grads = [p.grad for n, p in tiny_policy.unet.named_parameters() if "lora" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in flow_grads)
    assert any(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert metrics["dag/reward_calls"] == 6.0 and metrics["dag/unetreg"] == 0.0  # first pass: the sampling model


def test_beta_anneals_linearly_and_is_checkpointed():
    from diffalign.rollout import StepSettings

    method = Dag(DagConfig(reward_exp=100.0, anneal_epochs=4), StepSettings(**SETTINGS_KW), get("brightness"))
    betas = []
    for _ in range(6):
        method.targets(torch.zeros(2), ["a", "b"], None)
        betas.append(method.beta)
    assert betas == [0.0, 25.0, 50.0, 75.0, 100.0, 100.0]
    again = Dag(DagConfig(reward_exp=100.0, anneal_epochs=4), StepSettings(**SETTINGS_KW), get("brightness"))
    again.load_state_dict(json.loads(json.dumps(method.state_dict())))
    again.targets(torch.zeros(2), ["a", "b"], None)
    assert again.beta == 100.0 and again.epochs_seen == 7


def _tiny(tmp_path, name, **changes):
    return replace(preset("dag-kl-tiny"), run_dir=str(tmp_path / name), log_with="none", save_freq=1,
                   **{"sample.num_inference_steps": 3, "sample.batch_size_per_device": 2,
                      "sample.num_batches_per_epoch": 2, "train.batch_size_per_device": 2,
                      "reward.name": "brightness", "eval.samples": 2, "eval.diversity_prompts": 2,
                      "method.anneal_epochs": 2, **changes})


def test_a_run_resumes_bit_identically_with_its_flow_network(tmp_path):
    full = train(_tiny(tmp_path, "full", epochs=2)).run_dir
    first = train(_tiny(tmp_path, "part", epochs=1)).run_dir
    resumed = train(_tiny(tmp_path, "part", epochs=2, resume=str(first))).run_dir
    for part in ("trainable.safetensors", "modules/flow.safetensors"):
        a, b = load_file(full / "checkpoints/2" / part), load_file(resumed / "checkpoints/2" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["dag/beta"] for r in records] == [0.0, 50.0]
    summary = json.loads((full / "summary.json").read_text())
    assert "diversity_diversity" in summary["final"]
