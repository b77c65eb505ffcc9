"""Composite rewards (weighted sums with per-member values) and proxy/gold pairs."""

from __future__ import annotations

import pytest
import torch

from diffalign.rewards import Reward, RewardError, get
from diffalign.rewards.composite import CompositeReward, ProxyGold
from diffalign.rewards.jpeg import jpeg_size_kb

IMAGES = torch.stack([torch.full((3, 16, 16), 0.25), torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))])
PROMPTS = ["a", "b"]


def test_weighted_sum_and_components_by_hand():
    reward = get("composite", weights={"brightness": 2.0, "jpeg_compressibility": 0.5})
    values = reward(IMAGES, PROMPTS)
    brightness = IMAGES.mean(dim=(1, 2, 3))
    kilobytes = jpeg_size_kb(IMAGES)
    assert brightness[0].item() == pytest.approx(0.25)
    assert values.tolist() == pytest.approx((2.0 * brightness - 0.5 * kilobytes).tolist(), abs=1e-6)
    assert set(reward.last_components) == {"brightness", "jpeg_compressibility"}
    assert reward.last_components["jpeg_compressibility"].tolist() == pytest.approx((-kilobytes).tolist())
    assert reward.name == "composite(2*brightness + 0.5*jpeg_compressibility)"
    assert not reward.differentiable  # JPEG is not
    assert reward.score_components(IMAGES, PROMPTS)["brightness"].tolist() == pytest.approx(brightness.tolist())


def test_differentiable_when_all_weighted_members_are():
    brightness = get("brightness")
    reward = CompositeReward([(brightness, 3.0), (get("jpeg_incompressibility"), 0.0)])
    assert reward.differentiable
    images = IMAGES.clone().requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    per_pixel = 3.0 / images[0].numel()  # d(3 · mean)/dx
    assert images.grad.flatten().tolist() == pytest.approx([per_pixel] * images.numel())


class Failing(Reward):
    name = "failing"

    def score(self, images, prompts):
        return torch.full((len(prompts),), float("nan"))


def test_member_failure_names_the_member():
    reward = CompositeReward([(get("brightness"), 1.0), (Failing(), 1.0)])
    with pytest.raises(RewardError, match="reward 'failing' returned non-finite"):
        reward(IMAGES, PROMPTS)


def test_bad_composites():
    with pytest.raises(ValueError, match="at least one"):
        CompositeReward([])
    with pytest.raises(ValueError, match=r"distinct names; repeated: \['brightness'\]"):
        CompositeReward([(get("brightness"), 1.0), (get("brightness"), 2.0)])
    with pytest.raises(ValueError, match=r"member_kwargs names rewards \['ocr'\]"):
        CompositeReward.from_names({"brightness": 1.0}, member_kwargs={"ocr": {}})
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        CompositeReward.from_names({"nope": 1.0})


def test_proxy_gold_pair():
    pair = ProxyGold(proxy=get("brightness"), gold=get("jpeg_incompressibility"))
    images = IMAGES.clone().requires_grad_(True)
    scores = pair(images, PROMPTS)
    assert scores.proxy.requires_grad and not scores.gold.requires_grad
    assert scores.gold.tolist() == pytest.approx(jpeg_size_kb(IMAGES).tolist())
    metrics = pair.metrics(scores)
    assert metrics["reward/proxy_mean"] == pytest.approx(IMAGES.mean().item(), abs=1e-6)
    assert metrics["reward/gold_mean"] == pytest.approx(jpeg_size_kb(IMAGES).mean().item())
    same = get("brightness")
    with pytest.raises(ValueError, match="same reward object"):
        ProxyGold(proxy=same, gold=same)
