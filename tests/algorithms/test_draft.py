"""DRaFT-K / DRaFT-LV / AlignProp: truncated gradients, a finite-difference check, bounded memory, a run."""

import json

import pytest
import torch
from torch import nn

from diffalign.algorithms.base import Minibatching
from diffalign.algorithms.draft import Draft, DraftConfig
from diffalign.config import preset, replace
from diffalign.models import add_lora
from diffalign.rewards import get
from diffalign.rollout import StepSettings, sample
from diffalign.train.loop import train

SETTINGS = StepSettings(num_inference_steps=4, guidance_scale=1.0, eta=1.0)  # timesteps 751, 501, 251, 1


class EarlyGated(nn.Module):
    """The tiny UNet plus a parameter that only acts at t ≥ 500 (the first two of four steps)."""

    def __init__(self, unet):
        super().__init__()
        self.module, self.early = unet, nn.Parameter(torch.zeros(()))

    def forward(self, x, t, encoder_hidden_states):
        out = self.module(x, t, encoder_hidden_states=encoder_hidden_states)
        gate = (t >= 500).float().reshape(-1, 1, 1, 1)
        return type(out)(sample=out.sample + gate * self.early)


def _batches(policy, config, rows=2):
    rollout = sample(policy, ["a cat", "a dog"][:rows], [1, 2][:rows], SETTINGS)
    method = Draft(config, SETTINGS, get("brightness"))
    groups = list(method.minibatches(rollout, torch.zeros(rows), Minibatching(rows, 1),
                                     lambda k: torch.Generator().manual_seed(k)))
    return method, groups[0][0]


@pytest.mark.parametrize("k, reaches_early", [(2, False), (3, True)])
def test_gradients_stop_before_the_last_k_steps(tiny_policy, k, reaches_early):
    tiny_policy.unet = EarlyGated(tiny_policy.unet)
    method, batch = _batches(tiny_policy, DraftConfig(truncation=k))
    assert batch.timesteps.tolist() == [751, 501, 251, 1][-k:]
    loss, metrics = method.loss(tiny_policy, batch)
    loss.backward()
    grad = tiny_policy.unet.early.grad
    assert (grad is not None and grad.abs() > 0) == reaches_early
    assert metrics["draft/truncation"].item() == k


def test_gradient_matches_a_finite_difference_and_checkpointing_changes_nothing(tiny_policy):
    add_lora(tiny_policy.unet, rank=4, alpha=4.0)
    params = [p for n, p in tiny_policy.unet.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            if p.abs().max() == 0:  # LoRA B: away from zero, so every LoRA weight has a gradient
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    method, batch = _batches(tiny_policy, DraftConfig(truncation=2, checkpointing=True))
    method.loss(tiny_policy, batch)[0].backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    Draft(DraftConfig(truncation=2, checkpointing=False), SETTINGS, get("brightness")).loss(
        tiny_policy, batch)[0].backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g)
    # the directional derivative along the gradient, g·d with d = g/|g|, is |g|; central differences in fp32
    norm = torch.cat([g.flatten() for g in grads]).norm()
    eps = 0.1

    def loss_at(step: float) -> float:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(step * g / norm)
            value = method.loss(tiny_policy, batch)[0].item()
            for p, g in zip(params, grads):
                p.sub_(step * g / norm)
        return value

    assert norm > 0 and (loss_at(eps) - loss_at(-eps)) / (2 * eps) == pytest.approx(norm.item(), rel=0.05)


def _saved_bytes(policy, config) -> int:
    method, batch = _batches(policy, config)
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        method.loss(policy, batch)[0].backward()
    return total


def test_checkpointing_bounds_the_memory_kept_for_backward(tiny_policy):
    add_lora(tiny_policy.unet, rank=4, alpha=4.0)
    full = _saved_bytes(tiny_policy, DraftConfig(truncation=4, checkpointing=False))
    checkpointed = _saved_bytes(tiny_policy, DraftConfig(truncation=4, checkpointing=True))
    # without checkpointing every step keeps its UNet activations; with it, the forward keeps about one latent
    # per step plus the decoder's and the reward's activations, and the recomputation keeps one step at a time
    assert checkpointed < 0.6 * full, (checkpointed, full)


def test_lv_draws_several_last_steps_and_randomized_truncation_varies_k(tiny_policy):
    method, batch = _batches(tiny_policy, DraftConfig(truncation=1, lv_samples=3))
    assert batch.noises.shape[:2] == (1, 6)
    loss, metrics = method.loss(tiny_policy, batch)
    assert torch.isfinite(loss)
    rollout = sample(tiny_policy, ["a cat"] * 8, list(range(8)), SETTINGS)
    aligned = Draft(DraftConfig(truncation=4, randomized_truncation=True), SETTINGS, get("brightness"))
    ks = {len(g[0].timesteps) for g in aligned.minibatches(rollout, torch.zeros(8), Minibatching(1, 1),
                                                           lambda k: torch.Generator().manual_seed(k))}
    assert len(ks) > 1 and ks <= {1, 2, 3, 4}


def test_a_non_differentiable_reward_is_rejected_before_anything_runs():
    with pytest.raises(ValueError, match="draft backpropagates through the reward.*jpeg_compressibility"):
        Draft(DraftConfig(), SETTINGS, get("jpeg_compressibility"))
    errors = replace(preset("draft-tiny"), **{"reward.name": "jpeg_compressibility"}).validate()
    assert any("'jpeg_compressibility' is not differentiable" in e for e in errors)
    assert DraftConfig(truncation=2, lv_samples=2).validate() != []


def test_draft_tiny_runs_with_a_gold_reward_and_resumes_bit_identically(tmp_path):
    from safetensors.torch import load_file

    def config(name, epochs, **changes):
        return replace(preset("draft-tiny"), run_dir=str(tmp_path / name), epochs=epochs, log_with="none",
                       save_freq=1, **{"sample.num_inference_steps": 3, "reward.gold": "jpeg_compressibility"},
                       **changes)

    run = train(config("full", 2)).run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/gold_mean" in r and "draft/reward" in r for r in records)
    train(config("part", 1))
    resumed = train(config("part", 2, resume=str(tmp_path / "part"))).run_dir
    a, b = (load_file(r / "checkpoints/2/trainable.safetensors") for r in (run, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
