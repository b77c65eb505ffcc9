import time
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffalign.world.detector import classify_shape, connected_components, detect, detect_batch, kinds
from diffalign.world.render import render, render_batch
from diffalign.world.scenes import BACKGROUND, Object, Scene, sample_scene

N_SCENES = 1000


@pytest.fixture(scope="module")
def scenes_and_images():
    scenes = [sample_scene(100_000 + i) for i in range(N_SCENES)]
    return scenes, render_batch(scenes)


def accuracy(scenes, images):
    """Fraction of images whose detected (colour, shape) multiset equals the scene's, and with sizes."""
    detections = detect_batch(images)
    kind_ok = [kinds(d) == s.kinds() for s, d in zip(scenes, detections)]
    size_ok = [
        Counter((d.kind, d.size) for d in ds) == Counter((o.kind, o.size) for o in s.objects)
        for s, ds in zip(scenes, detections)
    ]
    return float(np.mean(kind_ok)), float(np.mean(size_ok))


def gaussian_blur(images, sigma):
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 5, 5)
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)


def test_accuracy_on_clean_renders(scenes_and_images):
    scenes, images = scenes_and_images
    kind_acc, size_acc = accuracy(scenes, images)
    assert kind_acc >= 0.99 and size_acc >= 0.99


def test_accuracy_under_gaussian_noise(scenes_and_images):
    scenes, images = scenes_and_images
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    assert accuracy(scenes, (images + 0.03 * noise).clamp(0, 1))[0] >= 0.99


def test_accuracy_under_box_blur(scenes_and_images):
    scenes, images = scenes_and_images
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert accuracy(scenes, blurred)[0] >= 0.99


def test_accuracy_under_gaussian_blur(scenes_and_images):
    scenes, images = scenes_and_images
    assert accuracy(scenes, gaussian_blur(images, 0.5))[0] >= 0.99


def test_batch_detection_is_fast(scenes_and_images):
    _, images = scenes_and_images
    start = time.perf_counter()
    detect_batch(images)
    assert time.perf_counter() - start < 4.0  # ~0.6 s measured on one core


def test_centroids_sizes_and_input_formats():
    scene = Scene(
        (
            Object("square", "red", "small", (6.5, 6.5)),
            Object("circle", "green", "large", (22.5, 8.5)),
            Object("triangle", "yellow", "large", (10.5, 24.5)),
        )
    )
    image = render(scene)
    found = {d.kind: d for d in detect(image)}
    assert set(found) == {("red", "square"), ("green", "circle"), ("yellow", "triangle")}
    assert found[("red", "square")].centre == pytest.approx((6.5, 6.5), abs=0.05)
    assert found[("green", "circle")].centre == pytest.approx((22.5, 8.5), abs=0.05)
    assert found[("yellow", "triangle")].centre == pytest.approx((10.5, 24.5 + 11 / 6), abs=0.3)  # centroid
    assert found[("red", "square")].size == "small" and found[("green", "circle")].size == "large"
    as_tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    assert detect(as_tensor) == detect(image)


def test_empty_image_and_speckles_give_no_objects():
    empty = np.broadcast_to(np.array(BACKGROUND, dtype=np.uint8), (32, 32, 3)).copy()
    assert detect(empty) == []
    empty[5, 5] = (220, 40, 40)  # a single red pixel is noise, not an object
    assert detect(empty) == []


def test_connected_components_separate_colours_and_touching_diagonals():
    colour = np.full((1, 5, 5), -1)
    colour[0, 0, 0] = colour[0, 1, 1] = 0  # diagonal neighbours: one component (8-connectivity)
    colour[0, 3, 3] = colour[0, 3, 4] = 1  # touching, but another colour
    colour[0, 4, 3] = 0
    labels = connected_components(colour)
    assert labels[0, 0, 0] == labels[0, 1, 1] and labels[0, 3, 3] == labels[0, 3, 4]
    assert len({labels[0, 0, 0], labels[0, 3, 3], labels[0, 4, 3]}) == 3
    assert (labels[colour < 0] == -1).all()


def test_shape_rule():
    assert classify_shape(1.0, 0.0) == "square"
    assert classify_shape(np.pi / 4, 0.0) == "circle"
    assert classify_shape(0.5, 1 / 6) == "triangle"


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="uint8"):
        detect(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        detect_batch(torch.zeros(2, 4, 32, 32))
