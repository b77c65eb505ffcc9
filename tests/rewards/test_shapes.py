import random

import pytest
import torch

import diffalign.rewards.shapes  # noqa: F401  (registers "shapes")
from diffalign.rewards import registry
from diffalign.rewards.base import RewardError
from diffalign.rewards.shapes import ShapesReward, check_caption
from diffalign.world.captions import parse_caption, sample_caption_spec, scene_for_caption
from diffalign.world.detector import detect
from diffalign.world.render import render_batch, render_tensor
from diffalign.world.scenes import Object, Scene


def image_of(*objects):
    return render_tensor(Scene(tuple(objects)))[None]


RED_CIRCLE = Object("circle", "red", "large", (8.5, 16.5))
BLUE_SQUARE = Object("square", "blue", "large", (24.5, 16.5))
SMALL_RED_CIRCLES = (Object("circle", "red", "small", (24.5, 8.5)), Object("circle", "red", "small", (24.5, 24.5)))


def test_registered_with_the_contract():
    reward = registry.get("shapes")
    assert isinstance(reward, ShapesReward)
    assert reward.name == "shapes" and not reward.differentiable and reward.needs_prompts


def test_scenes_for_captions_are_strictly_correct():
    rng = random.Random(0)
    splits = ["train"] * 300 + ["heldout"] * 200
    captions = [sample_caption_spec(rng, split, size_probability=0.5).text for split in splits]
    images = render_batch([scene_for_caption(c, rng) for c in captions])
    score, strict = ShapesReward().evaluate(images, captions)
    assert score.shape == (500,) and strict.dtype == torch.bool
    assert strict.float().mean() >= 0.99 and score.mean() >= 0.99
    assert torch.equal(strict, score == 1)
    assert torch.equal(ShapesReward()(images, captions), score)


@pytest.mark.parametrize(
    "caption, objects, expected",
    [
        ("a red circle", [RED_CIRCLE], 1.0),
        ("a red circle", [Object("circle", "blue", "large", (8.5, 16.5))], 0.0),  # wrong colour
        ("a red circle", [Object("square", "red", "large", (8.5, 16.5))], 0.0),  # wrong shape
        ("a red circle", [RED_CIRCLE, BLUE_SQUARE], 0.5),  # extra object
        ("a small red circle", [RED_CIRCLE], 2 / 3),  # wrong size
        ("a red circle and a blue square", [RED_CIRCLE], 1 / 3),  # missing object
        ("a red circle and a blue square", [RED_CIRCLE, BLUE_SQUARE], 1.0),
        ("a red circle left of a blue square", [RED_CIRCLE, BLUE_SQUARE], 1.0),
        ("a red circle right of a blue square", [RED_CIRCLE, BLUE_SQUARE], 0.75),  # relation wrong
        ("a red circle above a blue square", [RED_CIRCLE, BLUE_SQUARE], 0.75),  # same height: not above
        ("two red circles", [RED_CIRCLE, SMALL_RED_CIRCLES[0]], 1.0),
        ("two red circles", [RED_CIRCLE], 1 / 3),  # count wrong, not exact
        ("two red circles", [RED_CIRCLE, *SMALL_RED_CIRCLES], 1 / 3),  # one too many
    ],
)
def test_partial_credit_on_hand_made_images(caption, objects, expected):
    score, strict = ShapesReward().evaluate(image_of(*objects), [caption])
    assert score.item() == pytest.approx(expected)
    assert strict.item() == (expected == 1.0)


def test_empty_image_scores_zero():
    assert ShapesReward()(torch.full((1, 3, 32, 32), 0.08), ["a red circle"]).item() == 0.0


def test_constraint_list_explains_the_score():
    caption = parse_caption("a small red circle right of a blue square")
    checks = check_caption(caption, detect(image_of(RED_CIRCLE, BLUE_SQUARE)[0]))
    assert [name.split(":")[0] for name, _ in checks] == ["present", "size", "present", "relation", "exact"]
    assert [ok for _, ok in checks] == [True, False, True, False, True]


def test_larger_images_are_resized_before_detection():
    image = image_of(RED_CIRCLE, BLUE_SQUARE)
    large = torch.nn.functional.interpolate(image, scale_factor=4, mode="nearest")
    assert ShapesReward()(large, ["a red circle left of a blue square"]).item() == 1.0


def test_out_of_grammar_caption_raises_naming_reward_and_caption():
    with pytest.raises(RewardError, match=r"'shapes'.*'a purple circle'.*grammar accepts"):
        ShapesReward()(image_of(RED_CIRCLE), ["a purple circle"])
    with pytest.raises(RewardError, match="shapes"):
        ShapesReward().evaluate(image_of(RED_CIRCLE), ["a cat"])
    with pytest.raises(RewardError, match="empty"):
        ShapesReward()(image_of(RED_CIRCLE), [""])


def test_object_count_counts_rendered_objects_whatever_the_prompt():
    images = torch.cat([image_of(), image_of(RED_CIRCLE), image_of(RED_CIRCLE, BLUE_SQUARE),
                        image_of(RED_CIRCLE, *SMALL_RED_CIRCLES)])
    counts = registry.get("shapes_count")(images, ["", "two red circles", "", "anything"])
    torch.testing.assert_close(counts, torch.tensor([0.0, 1.0, 2.0, 3.0]))
