"""JPEG (in)compressibility, exactly as DDPO defines them (spec/ddpo_sdpo.md §1.7).

Images are converted to uint8 by ×255, round and clamp, saved as JPEG at quality 95, and the reward is the
file size in kilobytes (bytes / 1000); compressibility is its negative.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image

from diffalign.images import to_uint8
from diffalign.rewards.base import Reward
from diffalign.rewards.registry import register

JPEG_QUALITY = 95


def jpeg_size_kb(images: torch.Tensor) -> torch.Tensor:
    """Size in kB of each image [B, 3, H, W] in [0, 1] saved as a quality-95 JPEG."""
    sizes = []
    for array in to_uint8(images).numpy():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@register("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """Reward = JPEG size in kB: higher for images that compress badly (detail, noise)."""

    name = "jpeg_incompressibility"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return jpeg_size_kb(images).to(self.device)


@register("jpeg_compressibility")
class JpegCompressibility(Reward):
    """Reward = −JPEG size in kB: higher for images that compress well (flat, smooth)."""

    name = "jpeg_compressibility"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_size_kb(images).to(self.device)
