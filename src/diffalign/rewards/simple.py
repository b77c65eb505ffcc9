"""Cheap analytic rewards for tests and smoke runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffalign.rewards.base import Reward
from diffalign.rewards.registry import register


@register("brightness")
class Brightness(Reward):
    """Mean intensity of the image over channels and pixels, in [0, 1]; differentiable."""

    name = "brightness"
    differentiable = True

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))
