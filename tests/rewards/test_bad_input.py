"""Bad input to the zoo's rewards raises a RewardError that names the reward and says how to fix the input."""

from __future__ import annotations

import pytest
import torch

from diffalign.rewards import RewardError, get
from diffalign.rewards.aesthetic import AestheticHead


@pytest.fixture(scope="module")
def zoo(tiny_clip):
    return {
        "aesthetic": get("aesthetic", head=AestheticHead(), clip_model=tiny_clip),
        "pickscore": get("pickscore", model=tiny_clip),
        "imagenet_logprob": get("imagenet_logprob"),
        "composite(1*brightness + 1*clipscore)": get(
            "composite",
            weights={"brightness": 1.0, "clipscore": 1.0},
            member_kwargs={"clipscore": {"clip_model": tiny_clip}},
        ),
    }


NAMES = ["aesthetic", "pickscore", "imagenet_logprob", "composite(1*brightness + 1*clipscore)"]
PROMPTS = ["goldfish", "tench"]


@pytest.mark.parametrize("name", NAMES)
def test_wrong_range(zoo, name):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.raises(RewardError, match=rf"reward '{__import__('re').escape(name)}'.*\[0, 1\].*\(x \+ 1\) / 2"):
        zoo[name](images, PROMPTS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (2, 32, 32, 3)])
def test_wrong_shape(zoo, name, shape):
    with pytest.raises(RewardError, match=r"images must be a tensor \[B, 3, H, W\], got"):
        zoo[name](torch.rand(shape), PROMPTS)


@pytest.mark.parametrize("name", NAMES)
def test_uint8_and_prompt_count(zoo, name):
    with pytest.raises(RewardError, match=r"float in \[0, 1\].*images\.float\(\) / 255"):
        zoo[name](torch.zeros(2, 3, 32, 32, dtype=torch.uint8), PROMPTS)
    with pytest.raises(RewardError, match="expected a list of 2 prompts"):
        zoo[name](torch.rand(2, 3, 32, 32), PROMPTS[:1])
    with pytest.raises(RewardError, match="a single string"):
        zoo[name](torch.rand(2, 3, 32, 32), "goldfish")


@pytest.mark.parametrize("name", ["pickscore", "imagenet_logprob", "composite(1*brightness + 1*clipscore)"])
def test_empty_prompts(zoo, name):
    with pytest.raises(RewardError, match=r"scores images against their prompts, but prompts \[0\] are empty"):
        zoo[name](torch.rand(2, 3, 32, 32), ["", "tench"])


def test_prompt_free_reward_accepts_empty_prompts(zoo):
    assert zoo["aesthetic"](torch.rand(2, 3, 32, 32), ["", ""]).shape == (2,)
