import pytest
import torch

from diffalign.algorithms.advantages import PerPromptStatTracker, batch_advantages


def test_batch_advantages_hand_values():
    adv = batch_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    std = (1.25) ** 0.5  # population std of 1..4
    torch.testing.assert_close(adv, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std)


def test_falls_back_to_batch_stats_below_min_count():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    adv = tracker.update(["a", "a", "b", "b"], rewards)
    mean, std = 7.0, torch.tensor([1.0, 3.0, 10.0, 14.0]).std(unbiased=False).item()
    torch.testing.assert_close(adv, (rewards - mean) / (std + 1e-6))


def test_uses_the_prompts_buffer_once_it_has_min_count():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    adv = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 100.0]))
    # "a": buffer [1, 3] → mean 2, std 1; "b": one value < min_count → batch stats
    assert adv[0].item() == pytest.approx(-1 / (1 + 1e-6)) and adv[1].item() == pytest.approx(1 / (1 + 1e-6))
    batch = torch.tensor([1.0, 3.0, 100.0])
    assert adv[2].item() == pytest.approx(((100 - batch.mean()) / (batch.std(unbiased=False) + 1e-6)).item())
    adv = tracker.update(["a"], torch.tensor([5.0]))  # buffer [1, 3, 5]: mean 3, std sqrt(8/3)
    assert adv[0].item() == pytest.approx(2 / ((8 / 3) ** 0.5 + 1e-6))


def test_buffer_evicts_oldest_and_state_round_trips():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=1)
    tracker.update(["a"] * 3, torch.tensor([1.0, 2.0, 3.0]))
    assert list(tracker.buffers["a"]) == [2.0, 3.0]
    copy = PerPromptStatTracker(buffer_size=5, min_count=5)
    copy.load_state_dict(tracker.state_dict())
    assert copy.stats() == tracker.stats() and copy.buffers["a"].maxlen == 2
    torch.testing.assert_close(copy.update(["a"], torch.tensor([7.0])), tracker.update(["a"], torch.tensor([7.0])))


def test_placebo_permutes_advantages_only_within_their_group():
    from diffalign.algorithms.advantages import shuffle_within_groups

    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    prompts = ["a", "a", "a", "b", "b", "b"]
    shuffled = shuffle_within_groups(values, prompts, torch.Generator().manual_seed(0))
    assert sorted(shuffled[:3].tolist()) == [1.0, 2.0, 3.0] and sorted(shuffled[3:].tolist()) == [10.0, 20.0, 30.0]
    draws = {tuple(shuffle_within_groups(values, prompts, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(draws) > 1  # it does permute
    again = shuffle_within_groups(values, prompts, torch.Generator().manual_seed(0))
    assert torch.equal(again, shuffled)  # and is reproducible from its generator


def test_zero_advantage_fraction_counts_groups():
    from diffalign.algorithms.advantages import zero_advantage_fraction

    advantages = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0, 0.0])
    assert zero_advantage_fraction(advantages, ["a", "a", "b", "b", "c", "c"]) == pytest.approx(2 / 3)
    assert zero_advantage_fraction(torch.zeros(2, 3), ["a", "b"]) == 1.0  # per-step targets [B, T]
