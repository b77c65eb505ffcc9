"""Pure torch helpers on image tensors, the bottom layer every package may import (it imports nothing of diffalign).

Images travel through diffalign as float tensors ``[B, 3, H, W]`` in ``[0, 1]`` (DESIGN.md "Contracts").
"""

from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] floats in [0, 1] → uint8 NHWC, by ×255, round and clamp (as DDPO converts)."""
    return (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
