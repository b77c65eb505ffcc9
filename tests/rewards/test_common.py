"""The shared preprocessing against the reference implementations, and the optional-import errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.rewards import RewardError
from diffalign.rewards.common import (
    MissingDependencyError,
    center_crop,
    clip_preprocess,
    l2_normalize,
    letterbox,
    optional_import,
    resize_shortest_side,
)


def _quantised(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) * 255).round() / 255


def _pil(images):
    return [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in images]


@pytest.mark.parametrize("height,width", [(64, 64), (300, 400), (401, 300), (37, 50)])
def test_clip_preprocess_matches_clip_image_processor(height, width):
    """Same output size, crop window and values as transformers' CLIPImageProcessor (PIL bicubic, uint8).

    On uint8 noise (the hardest case for interpolation) the mean difference is ~0.005 in normalised units,
    about 0.35/255 of a pixel step: PIL rounds to uint8 between its two 1-D passes. A crop off by one pixel or
    a different kernel gives a mean difference above 0.1 on noise.
    """
    from transformers import CLIPImageProcessor

    images = _quantised((2, 3, height, width))
    reference = CLIPImageProcessor()(images=_pil(images), return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(images)
    assert ours.shape == reference.shape == (2, 3, 224, 224)
    difference = (ours - reference).abs()
    assert difference.mean() < 0.008
    assert torch.quantile(difference.flatten()[:200_000], 0.99) < 0.04


def test_resize_and_crop_sizes():
    images = torch.rand(1, 3, 300, 451)
    resized = resize_shortest_side(images, 224)
    assert resized.shape[-2:] == (224, int(224 * 451 / 300))  # truncation, as torchvision and HF
    assert resized.min() >= 0 and resized.max() <= 1
    grid = torch.arange(5 * 7, dtype=torch.float32).view(1, 1, 5, 7)
    assert center_crop(grid, 3).flatten().tolist() == [9, 10, 11, 16, 17, 18, 23, 24, 25]  # offsets (1, 2)
    with pytest.raises(ValueError, match="resize first"):
        center_crop(grid, 6)


def test_letterbox_pads_black_like_open_clip_resize_max_size():
    images = torch.ones(1, 3, 100, 200)  # white, wide
    boxed = letterbox(images, 224)
    assert boxed.shape == (1, 3, 224, 224)
    # longer side 200 → 224, shorter 100 → round(112) rows of white, 56 black rows above and below
    assert boxed[0, 0, :, 100].tolist() == pytest.approx([0.0] * 56 + [1.0] * 112 + [0.0] * 56, abs=1e-6)
    square = torch.rand(1, 3, 64, 64)
    assert torch.allclose(letterbox(square, 224), resize_shortest_side(square, 224))


def test_l2_normalize_leaves_zero_rows():
    features = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert l2_normalize(features).flatten().tolist() == pytest.approx([0.6, 0.8, 0.0, 0.0])


def test_clip_preprocess_is_differentiable():
    images = torch.rand(1, 3, 40, 40, requires_grad=True)
    clip_preprocess(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_optional_import_names_reward_and_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "some_missing_pkg", None)
    with pytest.raises(MissingDependencyError, match=r"reward 'demo' needs the 'some-pkg'.*pip install some-pkg"):
        optional_import("some_missing_pkg", "some-pkg", "demo")
    assert issubclass(MissingDependencyError, RewardError) and issubclass(MissingDependencyError, ImportError)
    assert optional_import("numpy", "numpy", "demo") is np
