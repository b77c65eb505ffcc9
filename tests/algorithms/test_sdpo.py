"""SDPO: the anchor choice, dense rewards with write-back, discounted returns, the per-(prompt, step) tracker, the
reward difference loss and its clipped variant on hand values; paired collection and the three reward queries on
the tiny model; step-outer minibatches; a run from the command line that resumes bit-identically."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from diffalign import cli
from diffalign.algorithms import ALGORITHMS
from diffalign.algorithms.advantages import PerPromptStepStatTracker
from diffalign.algorithms.base import Minibatching
from diffalign.algorithms.sdpo import (SDPO, SDPOConfig, anchor_steps, dense_rewards, discounted_returns,
                                       reward_difference_loss, second_seed, temporal_weights)
from diffalign.config import preset
from diffalign.models.policy import Schedule
from diffalign.rewards import Reward
from diffalign.rollout import Conditioning, Rollout, StepSettings, sample

SETTINGS = StepSettings(num_inference_steps=3, guidance_scale=1.0, eta=1.0)
R2 = math.sqrt(2)

# Two chains of N = 4 predictions, each x̂0 a 2-vector (C = 1, h = 1, w = 2).
# Row 0: (1, 0), (1, 1), (1, −1), (0, 1). Row 1: (1, 0), (−1, 1), (2, 2), (1, 1).
CHAINS = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.0, 1.0]],
                       [[1.0, 0.0], [-1.0, 1.0], [2.0, 2.0], [1.0, 1.0]]]).reshape(2, 4, 1, 1, 2)


def test_the_anchor_is_the_prediction_least_like_both_ends():
    # row 0, s^f + s^l per step: 1 + 0, 1/√2 + 1/√2, 1/√2 − 1/√2 = 0, 0 + 1 → step 2
    # row 1: 1 + 1/√2, −1/√2 + 0, 1/√2 + 1, 1/√2 + 1 → step 1
    assert anchor_steps(CHAINS).tolist() == [2, 1]
    # two steps (1, 0), (0, 1): both sums are 1 + 0, the first index wins; one step: step 0
    assert anchor_steps(torch.eye(2).reshape(1, 2, 1, 1, 2)).tolist() == [0]
    assert anchor_steps(CHAINS[:, :1]).tolist() == [0, 0]


def test_dense_rewards_interpolate_by_similarity_and_write_back_the_queried_values():
    dense = dense_rewards(CHAINS, torch.tensor([1.0, 0.0]), torch.tensor([3.0, -1.0]), torch.tensor([2.0, 4.0]),
                          torch.tensor([2, 1]))
    # row 0 (anchor 2, (1, −1)), step 1 (1, 1): s^f = 1/√2, s^a = 0, s^l = 1/√2 → (1/√2 + 0 + 2/√2) / (2/√2) = 1.5;
    # steps 0, 2, 3 hold R_f = 1, R_a = 3, R_l = 2 (step 0 interpolated would be (1 + 3/√2) / (1 + 1/√2) ≈ 1.83)
    # row 1 (anchor 1, (−1, 1)), step 2 (2, 2): s^f = 1/√2, s^a = 0, s^l = 1 → 4 / (1 + 1/√2) ≈ 2.3431
    torch.testing.assert_close(dense, torch.tensor([[1.0, 1.5, 3.0, 2.0], [0.0, -1.0, 4 / (1 + 1 / R2), 4.0]]))
    # an anchor on the first step: written last, R_a wins there (as the reference)
    first = dense_rewards(CHAINS, torch.tensor([1.0, 0.0]), torch.tensor([3.0, -1.0]), torch.tensor([2.0, 4.0]),
                          torch.tensor([0, 0]))
    assert first[:, 0].tolist() == [3.0, -1.0] and first[:, -1].tolist() == [2.0, 4.0]


def test_discounted_returns():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    # γ = 0.5: G_2 = 3, G_1 = 2 + 0.5·3 = 3.5, G_0 = 1 + 0.5·3.5 = 2.75
    torch.testing.assert_close(discounted_returns(rewards, 0.5), torch.tensor([[2.75, 3.5, 3.0]]))
    # γ = 1: suffix sums 6, 5, 3; γ = 0: the rewards themselves
    torch.testing.assert_close(discounted_returns(rewards, 1.0), torch.tensor([[6.0, 5.0, 3.0]]))
    torch.testing.assert_close(discounted_returns(rewards, 0.0), rewards)
    assert torch.equal(rewards, torch.tensor([[1.0, 2.0, 3.0]]))  # not modified in place


def test_tracker_falls_back_per_step_then_uses_its_buffers_and_round_trips():
    tracker = PerPromptStepStatTracker(buffer_size=4, min_count=3)
    advantages = tracker.update(["a", "a", "b"], torch.tensor([[1.0, 10.0], [3.0, 20.0], [5.0, 60.0]]))
    # every (prompt, step) buffer holds < 3 values → the whole batch at that step:
    # step 0: [1, 3, 5], mean 3, std √(8/3); step 1: [10, 20, 60], mean 30, std √(1400/3)
    s0, s1 = math.sqrt(8 / 3) + 1e-6, math.sqrt(1400 / 3) + 1e-6
    torch.testing.assert_close(advantages, torch.tensor([[-2 / s0, -20 / s1], [0.0, -10 / s1], [2 / s0, 30 / s1]]))
    advantages = tracker.update(["a", "a"], torch.tensor([[5.0, 30.0], [7.0, 40.0]]))
    # "a" now has 4 values per step: step 0 [1, 3, 5, 7], mean 4, std √5; step 1 [10, 20, 30, 40], mean 25, std √125
    torch.testing.assert_close(advantages, torch.tensor([[1 / (5**0.5 + 1e-6), 5 / (125**0.5 + 1e-6)],
                                                         [3 / (5**0.5 + 1e-6), 15 / (125**0.5 + 1e-6)]]))
    restored = PerPromptStepStatTracker(buffer_size=1, min_count=1)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    # buffer_size 4 evicts the oldest: step 0 [3, 5, 7, 9], mean 6, std √5 → (9 − 6)/√5
    after = tracker.update(["a"], torch.tensor([[9.0, 50.0]]))
    torch.testing.assert_close(after[0, 0], torch.tensor(3 / (5**0.5 + 1e-6)))
    assert torch.equal(restored.update(["a"], torch.tensor([[9.0, 50.0]])), after)
    assert restored.state_dict() == tracker.state_dict()
    with pytest.raises(ValueError, match="tracked with 2 steps, now given 3"):
        tracker.update(["a"], torch.zeros(1, 3))


def test_reward_difference_loss_and_its_pessimistic_clipped_variant():
    log_prob_1 = torch.tensor([0.3, -0.2], requires_grad=True)
    args = dict(log_prob_old_1=torch.zeros(2), adv_1=torch.tensor([1.0, 7.0]), log_prob_2=torch.tensor([0.1, 0.1]),
                log_prob_old_2=torch.zeros(2), adv_2=torch.tensor([-1.0, 0.0]), weights=torch.tensor([1.0, 0.5]),
                adv_clip_max=5.0)
    # pair 0: ΔA = 1 − (−1) = 2, w Δℓ = 1·(0.3 − 0.1) = 0.2 → L = 1.8² = 3.24
    # pair 1: ΔA = clip(7) − 0 = 5, w Δℓ = 0.5·(−0.2 − 0.1) = −0.15 → L = 5.15² = 26.5225; mean 14.88125
    plain = reward_difference_loss(log_prob_1, clip_range=0.0, **args)
    assert plain.item() == pytest.approx(14.88125)
    # ε = 0.05 clamps log π_θ: pair 0 Δℓ_clip = 0.05 − 0.05 = 0 → L_clip = 4 > 3.24;
    # pair 1 Δℓ_clip = −0.05 − 0.05 → w Δℓ_clip = −0.05 → L_clip = 5.05² = 25.5025 < 26.5225; mean(4, 26.5225)
    clipped = reward_difference_loss(log_prob_1, clip_range=0.05, **args)
    assert clipped.item() == pytest.approx(15.26125)
    # the max picks the clamped term for pair 0 (no gradient) and the plain one for pair 1:
    # ∂/∂log π¹ = 2·(w Δℓ − ΔA)·w / b = 2·(−5.15)·0.5 / 2 = −2.575
    clipped.backward()
    torch.testing.assert_close(log_prob_1.grad, torch.tensor([0.0, -2.575]))
    # the regression is zero when w Δℓ = ΔA
    zero = reward_difference_loss(torch.tensor([2.0]), torch.zeros(1), torch.tensor([1.0]), torch.zeros(1),
                                  torch.zeros(1), torch.tensor([-1.0]), torch.ones(1), 0.0, 5.0)
    assert zero.item() == 0.0
    # temporal weights λ^i / log_scale: 0.5^[0, 1, 2] / 2
    torch.testing.assert_close(temporal_weights(3, 0.5, 2.0), torch.tensor([0.5, 0.25, 0.125]))


def test_pairs_share_x_T_and_the_first_is_the_plain_sample(tiny_policy):
    rollout = SDPO(SDPOConfig(), SETTINGS).collect(tiny_policy, ["a cat", "a dog"], [11, 12])
    assert rollout.prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert rollout.seeds.tolist() == [11, second_seed(11), 12, second_seed(12)]
    assert torch.equal(rollout.latents[0, 0], rollout.latents[1, 0]) and not torch.equal(rollout.latents[0, 1],
                                                                                        rollout.latents[1, 1])
    plain = sample(tiny_policy, ["a cat"], [11], SETTINGS)
    torch.testing.assert_close(rollout.latents[:1], plain.latents)
    assert rollout.x0_preds.shape == (4, 3, *tiny_policy.latent_shape)
    torch.testing.assert_close(rollout.images, tiny_policy.decode(rollout.x0_preds[:, -1]))  # x̂0 of the last step


class CountingBrightness(Reward):
    """Mean pixel value; remembers how many images it scored."""

    name = "counting_brightness"

    def __init__(self):
        super().__init__()
        self.scored = 0

    def score(self, images, prompts):
        self.scored += len(images)
        return images.mean(dim=(1, 2, 3))


def test_the_reward_is_queried_at_the_first_anchor_and_last_steps_only(tiny_policy):
    method, reward = SDPO(SDPOConfig(), SETTINGS), CountingBrightness()
    rollout = method.collect(tiny_policy, ["a cat", "a dog"], [11, 12])
    with torch.no_grad():
        dense = method.score(tiny_policy, reward, rollout).scores
        anchor = anchor_steps(rollout.x0_preds)
        first = reward(tiny_policy.decode(rollout.x0_preds[:, 0]), rollout.prompts)
        at_anchor = reward(tiny_policy.decode(rollout.x0_preds[torch.arange(4), anchor]), rollout.prompts)
    assert dense.shape == (4, 3)
    torch.testing.assert_close(dense[:, 0], first)
    torch.testing.assert_close(dense[:, -1], reward(rollout.images, rollout.prompts))
    torch.testing.assert_close(dense[torch.arange(4), anchor], at_anchor)
    # 4 last + 4 first + one per anchor strictly inside the chain, before the checks above (12 images)
    assert reward.scored - 12 == 8 + int(((anchor > 0) & (anchor < 2)).sum())
    # one step: first, anchor and last are the same x̂0, scored once
    one_step, reward = SDPO(SDPOConfig(), StepSettings(1, 1.0, 1.0)), CountingBrightness()
    rollout = one_step.collect(tiny_policy, ["a cat"], [11])
    with torch.no_grad():
        dense = one_step.score(tiny_policy, reward, rollout).scores
    assert reward.scored == 2 and dense.shape == (2, 1)
    torch.testing.assert_close(dense[:, 0], reward(rollout.images, rollout.prompts))


def test_minibatches_run_step_outer_with_each_pairs_steps_permuted():
    pairs, steps = 4, 4
    rows = 2 * pairs
    code = 100 * torch.arange(rows)[:, None] + torch.arange(steps + 1)  # latent of row r before step s: 100 r + s
    rollout = Rollout(prompts=["p"] * rows, conditioning=Conditioning(torch.zeros(rows, 1, 1)),
                      seeds=torch.arange(rows), latents=code.float().reshape(rows, steps + 1, 1, 1, 1),
                      timesteps=torch.arange(steps).flip(0).expand(rows, -1), log_probs=torch.zeros(rows, steps),
                      images=torch.zeros(rows, 3, 1, 1))
    targets = code[:, :steps].float()
    method = SDPO(SDPOConfig(lam=0.5), StepSettings(num_inference_steps=steps))
    groups = list(method.minibatches(rollout, targets, Minibatching(batch_size=2, accumulation=2),
                                     lambda k: torch.Generator().manual_seed(k)))
    # one optimizer step per step position: (4 pairs / 2) / accumulation 2 micro-batches, not × the number of steps
    assert len(groups) == steps and all(len(g) == 2 for g in groups)
    orders: dict[int, list[int]] = {}
    for group in groups:
        for batch in group:
            row, step = (batch.transitions.x_t.flatten().long() // 100).tolist(), batch.transitions.step_index
            assert row[0::2] == [r - 1 for r in row[1::2]] and all(r % 2 == 0 for r in row[0::2])  # pairs 2k, 2k+1
            assert torch.equal(step[0::2], step[1::2])  # both trajectories of a pair at the same step
            assert torch.equal(batch.transitions.advantages, targets[row, step])  # each its own per-step advantage
            torch.testing.assert_close(batch.weights, 0.5 ** step[0::2].float())  # λ^i of the step's own index
            for r, s in zip(row[0::2], step[0::2].tolist()):
                orders.setdefault(r // 2, []).append(s)
    assert all(sorted(order) == list(range(steps)) for order in orders.values()) and len(orders) == pairs
    assert len({tuple(order) for order in orders.values()}) > 1  # each pair's steps in its own order


def test_registered_with_presets_and_validation():
    assert ALGORITHMS["sdpo"] is SDPO
    assert preset("sdpo-tiny").algorithm == "sdpo" and preset("sdpo-shapes").validate() == []
    turbo = preset("sdpo-sd-turbo")
    assert turbo.validate() == [] and turbo.model.name == "stabilityai/sd-turbo"
    assert (turbo.sample.guidance_scale, turbo.sample.num_inference_steps) == (1.0, 50)
    errors = SDPOConfig(gamma=1.5, lam=0.0, clip_range=-1.0).validate(StepSettings(eta=0.0))
    assert errors == ["method.gamma must be in [0, 1], got 1.5", "method.lam must be in (0, 1], got 0.0",
                      "method.clip_range must be >= 0, got -1.0",
                      "sample.eta must be > 0 for sdpo (a pair diverges through the step noise, and its log-probs "
                      "need a stochastic sampler), got 0.0"]


def test_sd_turbos_own_scheduler_config_gives_trailing_timesteps():
    # stabilityai/sd-turbo scheduler/scheduler_config.json (the keys the schedule reads)
    config = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
              "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing"}
    schedule = Schedule.from_scheduler_config(config)
    # trailing: round(arange(1000, 0, −1000/N)) − 1; one step starts at the highest noise level
    assert schedule.timesteps(4).tolist() == [999, 749, 499, 249] and schedule.timesteps(1).tolist() == [999]


def _train(run, *extra):
    cli.main(["train", "--algorithm", "sdpo", "--preset", "sdpo-tiny", "--run-dir", str(run), "--log-with", "none",
              "--eval.samples", "2", *extra])
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """sdpo-tiny on two prompts (so the tracker's buffers fill and matter): 3 epochs, and 1 + a resume to 3."""
    root = tmp_path_factory.mktemp("sdpo")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    full = _train(root / "full", "--epochs", "3", "--prompts", str(prompts))
    _train(root / "part", "--epochs", "1", "--prompts", str(prompts))
    again = _train(root / "part", "--epochs", "3", "--prompts", str(prompts), "--resume", str(root / "part"))
    return root, full, again


def test_a_run_from_the_command_line(runs):
    root, full, _ = runs
    # 4 step positions × (4 pairs / 2 per micro-batch) / accumulation 1 = 8 optimizer steps per epoch
    assert [r["global_step"] for r in full] == [8, 16, 24]
    for r in full:
        assert {"policy/loss", "policy/approx_kl", "sdpo/clipfrac", "sdpo/adv_clipfrac", "reward/first_step_mean",
                "kl/to_base"} <= set(r)
        assert math.isfinite(r["policy/loss"]) and 0 <= r["sdpo/clipfrac"] <= 1
    weights = load_file(root / "full" / "checkpoints" / "3" / "trainable.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())


def test_resumes_bit_identically_with_the_tracker(runs):
    root, full, again = runs
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(r) for r in full] == [strip(r) for r in again]
    states = [json.loads((root / run / "checkpoints/3/trainer_state.json").read_text()) for run in ("full", "part")]
    buffers = states[0]["algorithm"]["stat_tracker"]["buffers"]
    assert set(buffers) == {"a cat", "a dog"} and states[0]["algorithm"] == states[1]["algorithm"]
    assert sum(len(buffers[p][0]) for p in buffers) == 3 * 8  # every trajectory's return at step 0, both prompts
    a, b = (load_file(root / name / "checkpoints/3/trainable.safetensors") for name in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
