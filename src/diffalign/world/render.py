"""Render ShapesWorld scenes with PIL: 4× supersampled drawing, box-filtered down to 32×32.

Rendering is a pure function of the scene (no hidden randomness), so an image is a pure function of the seed
its scene was sampled from: :func:`render_random` makes that explicit. Edges are anti-aliased by the box filter
(each output pixel is the exact area average of 4×4 drawn pixels), as a diffusion model's output would be.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffalign.world.scenes import BACKGROUND, COLOURS, IMAGE_SIZE, Object, RandomSource, Scene, sample_scene

SUPERSAMPLE = 4


def _draw_object(draw: ImageDraw.ImageDraw, obj: Object, scale: int) -> None:
    """Draws one object on a canvas ``scale`` times the image size."""
    x0, y0, x1, y1 = (v * scale for v in obj.bbox)
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif obj.shape == "triangle":  # apex up, base = height = size
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:  # Object validates its shape
        raise AssertionError(obj.shape)


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 array ``[32, 32, 3]`` (HWC, RGB)."""
    scale = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw_object(draw, obj, scale)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` → float tensor ``[3, H, W]`` in [0, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 array [H, W, 3], got {image.dtype} {image.shape}")
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def render_tensor(scene: Scene) -> torch.Tensor:
    """The scene as a float tensor ``[3, 32, 32]`` in [0, 1]."""
    return to_tensor(render(scene))


def render_batch(scenes: Sequence[Scene]) -> torch.Tensor:
    """Scenes as a float tensor ``[B, 3, 32, 32]`` in [0, 1]."""
    if not scenes:
        raise ValueError("render_batch needs at least one scene")
    return torch.stack([render_tensor(s) for s in scenes])


def render_random(generator: RandomSource) -> tuple[Scene, np.ndarray]:
    """Samples a random scene from ``generator`` and renders it: same seed → identical bytes."""
    scene = sample_scene(generator)
    return scene, render(scene)
