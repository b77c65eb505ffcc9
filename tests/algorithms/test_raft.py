"""RAFT / P-GRAFT: the selection, the denoising loss for each parameterisation, the noise-level cut-off, a run."""

import dataclasses
import json

import pytest
import torch

from diffalign.algorithms.base import Minibatching
from diffalign.algorithms.raft import DenoisingBatch, Raft, RaftConfig, select_best, timesteps_of
from diffalign.config import preset, replace
from diffalign.rollout import Conditioning, StepSettings, sample
from diffalign.train.loop import train


def test_select_best_keeps_the_top_k_of_each_group_above_the_threshold():
    rewards = torch.tensor([0.2, 0.9, 0.5, 1.0, 1.0, 0.3])
    prompts = ["a", "a", "a", "b", "b", "b"]
    assert select_best(rewards, prompts, top_k=1).tolist() == [0, 1, 0, 1, 0, 0]  # a tie keeps the earlier
    assert select_best(rewards, prompts, top_k=2).tolist() == [0, 1, 1, 1, 1, 0]
    assert select_best(rewards, prompts, top_k=2, threshold=1.0).tolist() == [0, 0, 0, 1, 1, 0]


def test_levels_map_uniformly_onto_the_trained_timesteps():
    levels = torch.tensor([0.0, 0.5, 0.999999, 1.0])
    assert timesteps_of(levels, 0, 1000).tolist() == [0, 500, 999, 999]
    assert timesteps_of(levels, 600, 1000).tolist() == [600, 800, 999, 999]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_denoising_loss_hand_values(tiny_policy, prediction_type):
    policy = tiny_policy
    policy.schedule = dataclasses.replace(policy.schedule, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    embeds = policy.encode_prompts(["a cat", "a dog"])
    batch = DenoisingBatch(x0, Conditioning(embeds), torch.tensor([0.25, 0.75]), noise, torch.tensor([1.0, 0.0]))
    loss, metrics = Raft(RaftConfig(caption_dropout=0), StepSettings()).loss(policy, batch)
    t = torch.tensor([250, 750])
    alpha = policy.schedule.alphas_cumprod[t].reshape(2, 1, 1, 1)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    target = {"epsilon": noise, "sample": x0, "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * x0}
    with torch.no_grad():
        output = policy.model_output(x_t, t, embeds)
    per_row = (output - target[prediction_type]).square().mean(dim=(1, 2, 3))
    assert loss.item() == pytest.approx(per_row[0].item() / 2, rel=1e-5)  # the second row has weight 0
    assert metrics["denoise/loss"].item() == pytest.approx(per_row.mean().item(), rel=1e-5)


def test_minibatches_draw_kept_rows_and_pad_with_zero_weight(tiny_policy):
    settings = StepSettings(num_inference_steps=3, guidance_scale=2.0)
    rollout = sample(tiny_policy, ["a cat"] * 4, [1, 2, 3, 4], settings)
    method = Raft(RaftConfig(updates_per_epoch=3, caption_dropout=0.5), settings)
    generator_for = lambda k: torch.Generator().manual_seed(k)  # noqa: E731
    groups = list(method.minibatches(rollout, torch.tensor([0.0, 1.0, 0.0, 0.0]), Minibatching(2, 2), generator_for))
    assert len(groups) == 3 and all(len(g) == 2 for g in groups)
    assert all(torch.equal(b.x0, rollout.latents[[1, 1], -1]) and b.weights.tolist() == [1.0, 1.0]
               for g in groups for b in g)
    dropped = [torch.equal(b.conditioning.prompt_embeds[0], rollout.negative_embeds[0]) for g in groups for b in g]
    assert any(dropped) and not all(dropped)  # caption dropout swaps in the negative prompt's embedding
    empty = list(method.minibatches(rollout, torch.zeros(4), Minibatching(2, 1), generator_for))
    assert len(empty) == 3 and all(b.weights.sum() == 0 for g in empty for b in g)


def test_raft_tiny_runs_and_resumes_bit_identically(tmp_path):
    from safetensors.torch import load_file

    def config(name, epochs, **changes):
        return replace(preset("raft-tiny"), run_dir=str(tmp_path / name), epochs=epochs, log_with="none",
                       save_freq=1, **{"sample.num_inference_steps": 3, "reward.name": "brightness"}, **changes)

    run = train(config("full", 2)).run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == [2, 4] and all(r["denoise/loss"] > 0 for r in records)
    train(config("part", 1))
    resumed = train(config("part", 2, resume=str(tmp_path / "part"))).run_dir
    a, b = (load_file(r / "checkpoints/2/trainable.safetensors") for r in (run, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_presets_validate():
    assert preset("raft-shapes").validate() == [] and preset("raft-shapes").algorithm == "raft"
    errors = RaftConfig(top_k=0, caption_dropout=0.5).validate(StepSettings(guidance_scale=1.0))
    assert any("top_k must be >= 1" in e for e in errors) and any("caption_dropout needs" in e for e in errors)
