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


@register("random_classifier")
class RandomClassifier(Reward):
    """The scalar output of a randomly initialised image classifier: RCGD's synthetic ground-truth reward
    (Yuan et al. 2023, the reference's ``fake_dataset.py``). Differentiable.

    The reference puts a freshly initialised ``Linear(512, 1)`` on an ImageNet-pretrained ResNet-18; with no
    model hub here the whole network is drawn at random, from ``seed``: three stride-2 3×3 convolutions
    (3 → 16 → 32 → 64 channels, ReLU), global average pooling and a linear head, on images resized to 32×32. The
    reward is a fixed, smooth, non-trivial function of the pixels, the same for a seed on every machine; its
    scale is whatever the draw gives (labels are not normalised).
    """

    name = "random_classifier"
    differentiable = True

    def __init__(self, device: str | torch.device = "cpu", seed: int = 0):
        super().__init__(device)
        if not 0 <= seed < 2**63:
            raise ValueError(f"reward {self.name!r}: seed must be in [0, 2**63), got {seed}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 1),
            )
        self.network.to(self.device).eval().requires_grad_(False)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        images = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True,
                                                 align_corners=False)
        return self.network((images - 0.5) / 0.5).squeeze(1)
