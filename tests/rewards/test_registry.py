"""Every registered reward honours the contract on a 2-image CPU batch (tiny models through kwargs).

A reward registered without an entry in ``CASES`` fails ``test_every_registered_reward_has_a_case``: add its
constructor kwargs (tiny models, no downloads) and two valid prompts here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import diffalign.rewards as rewards
from diffalign.rewards import Reward
from diffalign.rewards.aesthetic import AestheticHead
from diffalign.rewards.imagereward import ImageRewardHead

Fixture = Callable[[str], object]


def _shapes_prompts(fixture: Fixture) -> list[str]:
    from diffalign.prompts import get as get_prompts

    return get_prompts("shapes").draw(2, torch.Generator().manual_seed(0))


CASES: dict[str, Callable[[Fixture], tuple[dict, list[str]]]] = {
    "aesthetic": lambda fx: ({"head": AestheticHead(), "clip_model": fx("tiny_clip")}, ["", ""]),
    "brightness": lambda fx: ({}, ["", ""]),
    "clipscore": lambda fx: ({"clip_model": fx("tiny_clip")}, ["a red circle", "a cat on the moon"]),
    "composite": lambda fx: ({"weights": {"brightness": 1.0, "jpeg_compressibility": 0.1}}, ["", ""]),
    "hpsv2": lambda fx: ({"model": fx("tiny_clip")}, ["a red circle", "a cat on the moon"]),
    "http": lambda fx: ({"url": fx("brightness_server").url, "max_retries": 0}, ["", ""]),
    "imagenet_logprob": lambda fx: ({}, ["goldfish", "tench, Tinca tinca"]),
    "imagereward": lambda fx: ({"blip": fx("tiny_blip"), "head": ImageRewardHead(32)}, ["a red circle", "a cat"]),
    "jpeg_compressibility": lambda fx: ({}, ["", ""]),
    "jpeg_incompressibility": lambda fx: ({}, ["", ""]),
    "ocr": lambda fx: ({"num_threads": 1, "det_limit_side_len": 320}, ['a sign that says "hi"', 'a "STOP" sign']),
    "pickscore": lambda fx: ({"model": fx("tiny_clip")}, ["a red circle", "a cat on the moon"]),
    "random_classifier": lambda fx: ({"seed": 3}, ["", ""]),
    "shapes": lambda fx: ({}, _shapes_prompts(fx)),
    "shapes_count": lambda fx: ({}, ["", ""]),
    "shapes_learned": lambda fx: ({}, _shapes_prompts(fx)),
}


@pytest.fixture(scope="module")
def brightness_server():
    pytest.importorskip("uvicorn")
    from diffalign.serve.reward_server import serve_in_thread

    server = serve_in_thread(rewards.get("brightness"))
    yield server
    server.stop()


def test_every_registered_reward_has_a_case():
    missing = sorted(set(rewards.names()) - set(CASES))
    if missing:
        pytest.fail(
            f"rewards {missing} are registered but have no entry in CASES in tests/rewards/test_registry.py; "
            "add their tiny-model kwargs and two valid prompts so the contract test covers them"
        )


@pytest.mark.parametrize("name", rewards.names())
def test_registered_reward_contract(name, request):
    if name not in CASES:
        pytest.fail(f"reward {name!r} has no entry in CASES (see test_every_registered_reward_has_a_case)")
    kwargs, prompts = CASES[name](request.getfixturevalue)
    reward = rewards.get(name, device="cpu", **kwargs)
    assert isinstance(reward, Reward)
    assert isinstance(reward.differentiable, bool) and isinstance(reward.needs_prompts, bool)
    assert reward.device == torch.device("cpu")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(reward.differentiable)
    values = reward(images, prompts)
    assert isinstance(values, torch.Tensor)
    assert values.dtype == torch.float32 and values.shape == (2,) and values.device.type == "cpu"
    assert torch.isfinite(values).all()
    if reward.differentiable:  # declared differentiable: the gradient really reaches the pixels
        values.sum().backward()
        assert images.grad is not None and torch.isfinite(images.grad).all()
    else:
        assert not values.requires_grad


def test_string_keyword_arguments_take_the_declared_types():
    from diffalign import rewards

    assert rewards.get("shapes", relation_margin_px="3.5").relation_margin_px == 3.5
    with pytest.raises(ValueError, match="relation_margin_px"):
        rewards.get("shapes", relation_margin_px="wide")
    with pytest.raises(ValueError, match="takes no keyword 'margin'.*relation_margin_px"):
        rewards.get("shapes", margin="3")


def test_output_carries_components_and_the_strict_flag():
    from diffalign import rewards
    from diffalign.world import render_tensor, sample_example

    caption, scene = sample_example(0, split="train")
    images = render_tensor(scene).unsqueeze(0)
    shapes = rewards.get("shapes").output(images, [caption])
    assert shapes.scores.tolist() == [1.0] and shapes.strict.tolist() == [True] and shapes.components == {}
    plain = rewards.get("brightness").output(images, [caption])
    assert plain.strict is None and plain.scores.tolist() == rewards.get("brightness")(images, [caption]).tolist()
    both = rewards.get("composite", weights="shapes=1, brightness=0.5").output(images, [caption])
    assert set(both.components) == {"shapes", "brightness"}
    expected = both.components["shapes"] + 0.5 * both.components["brightness"]
    assert both.scores.tolist() == pytest.approx(expected.tolist())
