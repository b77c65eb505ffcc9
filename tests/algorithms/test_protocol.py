"""The method protocol carries a method the loop has never heard of: extra modules with their own learning rate,
per-step targets, its own state in checkpoints, and an exact resume."""

import json
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from diffalign import algorithms
from diffalign.algorithms.base import Algorithm, ExtraModule, MethodConfig
from diffalign.config import Config, preset, replace
from diffalign.rollout import Transitions, transition_log_prob, transitions
from diffalign.train.loop import train


@dataclass
class BaselineConfig(MethodConfig):
    """A toy method: REINFORCE with a learned per-step baseline b(x_t) (a linear value head)."""

    value_learning_rate: float = 1e-2


class Baseline(Algorithm):
    name = "toy_baseline"
    config_class = BaselineConfig

    def __init__(self, config, settings, reward=None):
        super().__init__(config, settings, reward)
        self.modules["value"] = ExtraModule(nn.Linear(4, 1), config.value_learning_rate)
        self.calls = 0

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        return rewards[:, None].expand(-1, self.settings.num_inference_steps).clone()  # per-step targets [B, T]

    def minibatches(self, rollout, targets, plan, generator_for):
        rows = torch.randperm(len(rollout), generator=generator_for(0))
        for j in range(rollout.num_steps):
            yield [transitions(rollout, rows, torch.full_like(rows, j), targets)]

    def loss(self, policy, batch: Transitions):
        value = self.modules["value"].module(batch.x_t.mean(dim=(2, 3))).squeeze(1)
        step = transition_log_prob(policy, batch, self.settings)
        advantage = batch.advantages - value.detach()
        loss = -(advantage * step.log_prob).mean() + (value - batch.advantages).square().mean()
        return loss, {"value/loss": (value - batch.advantages).square().mean().detach()}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


@pytest.fixture()
def registered(monkeypatch):
    monkeypatch.setitem(algorithms.ALGORITHMS, Baseline.name, Baseline)


def _config(tmp_path, name, **changes) -> Config:
    base = replace(preset("ddpo-tiny"), run_dir=str(tmp_path / name), log_with="none", save_freq=1,
                   **{"sample.num_inference_steps": 3, "sample.batch_size_per_device": 2,
                      "sample.num_batches_per_epoch": 1, "train.batch_size_per_device": 2,
                      "reward.name": "brightness"})
    return replace(base, method=BaselineConfig(), **changes)


def test_an_unknown_method_runs_checkpoints_and_resumes_exactly(registered, tmp_path):
    full = train(_config(tmp_path, "full", epochs=2))
    assert full.algorithm.calls == 2
    run = full.run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == [3, 6] and all("value/loss" in r for r in records)
    assert json.loads((run / "config.json").read_text())["algorithm"] == "toy_baseline"
    state = json.loads((run / "checkpoints/2/trainer_state.json").read_text())
    assert state["algorithm"] == {"calls": 2}
    value = load_file(run / "checkpoints/2/modules/value.safetensors")
    assert not torch.equal(value["weight"], nn.Linear(4, 1).weight.detach())  # trained (vs any fresh init)

    train(_config(tmp_path, "part", epochs=1))
    resumed = train(_config(tmp_path, "part", epochs=2, resume=str(tmp_path / "part")))
    assert resumed.algorithm.calls == 2
    again = load_file(resumed.run_dir / "checkpoints/2/modules/value.safetensors")
    assert all(torch.equal(value[k], again[k]) for k in value)
    a = load_file(run / "checkpoints/2/trainable.safetensors")
    b = load_file(resumed.run_dir / "checkpoints/2/trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_extra_module_gets_its_own_learning_rate(registered, tmp_path):
    optimizer = torch.load(train(_config(tmp_path, "lr", epochs=1)).run_dir / "checkpoints/1/optimizer.pt",
                           weights_only=True)
    assert [group["lr"] for group in optimizer["param_groups"]] == [1e-3, 1e-2]


def test_a_config_of_an_unregistered_method_is_rejected(tmp_path):
    errors = _config(tmp_path, "x").validate()
    assert any("BaselineConfig is not the config of a registered method" in e for e in errors)
