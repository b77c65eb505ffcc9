import numpy as np
import torch

from diffalign.world.render import render, render_batch, render_random, render_tensor
from diffalign.world.scenes import BACKGROUND, COLOURS, Object, Scene


def test_same_seed_gives_identical_bytes_and_different_seeds_differ():
    scene_a, image_a = render_random(123)
    scene_b, image_b = render_random(123)
    assert scene_a == scene_b and image_a.tobytes() == image_b.tobytes()
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert render_random(g1)[1].tobytes() == render_random(g2)[1].tobytes()
    images = {render_random(seed)[1].tobytes() for seed in range(50)}
    assert len(images) == 50


def test_pixels_are_exact_for_a_square_and_background():
    scene = Scene((Object("square", "red", "small", (10.5, 12.5)),))
    image = render(scene)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    changed = np.any(image != np.array(BACKGROUND, dtype=np.uint8), axis=-1)
    assert changed.sum() == 49  # 7×7, pixel-aligned: no anti-aliased edge
    ys, xs = np.nonzero(changed)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (7, 13, 9, 15)
    assert tuple(image[12, 10]) == COLOURS["red"]


def test_circle_and_triangle_areas_match_geometry():
    for shape, expected in (("circle", np.pi * 5.5**2), ("triangle", 11 * 11 / 2)):
        image = render(Scene((Object(shape, "blue", "large", (15.5, 15.5)),))).astype(float)
        coverage = (image[..., 2] - BACKGROUND[2]) / (COLOURS["blue"][2] - BACKGROUND[2])
        assert abs(coverage.sum() - expected) / expected < 0.03


def test_tensor_layout_and_range():
    scene = render_random(1)[0]
    tensor = render_tensor(scene)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert 0 <= tensor.min() and tensor.max() <= 1
    assert torch.equal(tensor, torch.from_numpy(render(scene)).permute(2, 0, 1).float() / 255)
    assert render_batch([scene, scene]).shape == (2, 3, 32, 32)
