import random
from itertools import combinations

import pytest
import torch

from diffalign.world.scenes import (
    BORDER_PX,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    Object,
    as_random,
    boxes_apart,
    place_objects,
    sample_scene,
)


def test_sample_scene_is_a_function_of_the_seed():
    assert sample_scene(7) == sample_scene(7)
    assert sample_scene(7) != sample_scene(8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [sample_scene(g1) for _ in range(5)] == [sample_scene(g2) for _ in range(5)]
    assert sample_scene(random.Random(5)) == sample_scene(random.Random(5))


def test_scenes_hold_one_to_four_valid_non_overlapping_objects():
    counts = set()
    for seed in range(500):
        scene = sample_scene(seed)
        counts.add(len(scene.objects))
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.colour in COLOURS and obj.size in SIZES
            x0, y0, x1, y1 = obj.bbox
            assert min(x0, y0) >= BORDER_PX and max(x1, y1) <= IMAGE_SIZE - BORDER_PX
        for a, b in combinations(scene.objects, 2):
            assert boxes_apart(a, b)
    assert counts == {1, 2, 3, 4}


def test_four_large_objects_can_always_be_placed():
    specs = [("square", "red", "large")] * 4
    for seed in range(20):
        assert len(place_objects(specs, seed).objects) == 4


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="colour 'purple'.*red, green, blue, yellow"):
        Object("circle", "purple", "small", (5.5, 5.5))
    with pytest.raises(ValueError, match="size 'huge'"):
        Object("circle", "red", "huge", (5.5, 5.5))
    with pytest.raises(ValueError, match="1 to 4 objects"):
        place_objects([("circle", "red", "small")] * 5, 0)
    with pytest.raises(TypeError, match="generator"):
        as_random("seed")
