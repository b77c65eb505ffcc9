"""CLIP score: prompt–image agreement as ``w · max(cos(E_image, E_text), 0)`` with ``w = 100``.

Provenance: Hessel et al. 2021, "CLIPScore" (eq. 1, ``w = 2.5``); torchmetrics ``CLIPScore`` (``w = 100``, default
model ``openai/clip-vit-large-patch14``, ``CLIPProcessor`` preprocessing, text truncated to the model's 77 tokens).

Where we differ from torchmetrics: torchmetrics clamps the *batch mean* (``max(mean(100·cos), 0)``); a reward needs
one value per image, so we clamp each image's score, as Hessel et al. do. ``weight`` sets ``w`` (2.5 for the paper's
scale). The seed repos (DDPO/SDPO) have no CLIP-score reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffalign.rewards.base import Reward
from diffalign.rewards.common import (
    clip_image_features,
    clip_preprocess,
    clip_text_features,
    l2_normalize,
    load_clip_model,
    load_tokenizer,
)
from diffalign.rewards.registry import register

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedTokenizerBase


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor, weight: float = 100.0) -> torch.Tensor:
    """``weight · max(cos, 0)`` per row of ``[B, D]`` image and text features (not necessarily normalised)."""
    cosine = (l2_normalize(image_features) * l2_normalize(text_features)).sum(dim=-1)
    return weight * cosine.clamp(min=0)


@register("clipscore")
class ClipScoreReward(Reward):
    """``100 · max(cos, 0)`` between CLIP's image and prompt embeddings; differentiable (zero gradient where cos < 0).

    Args:
        clip_model: hub id, local folder or ``CLIPModel`` (default torchmetrics' ``openai/clip-vit-large-patch14``).
        tokenizer: ``None`` for OpenAI CLIP's BPE built offline (identical ids), or a tokenizer / its folder.
        weight: ``w`` in ``w · max(cos, 0)``: 100 (torchmetrics) or 2.5 (Hessel et al.).
    """

    name = "clipscore"
    differentiable = True
    needs_prompts = True

    def __init__(
        self,
        clip_model: str | Path | CLIPModel = "openai/clip-vit-large-patch14",
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        weight: float = 100.0,
        device: str | torch.device = "cpu",
    ):
        super().__init__(device)
        self.clip = load_clip_model(clip_model, self.name, self.device)
        self.tokenizer = load_tokenizer(tokenizer, self.name)
        self.weight = float(weight)
        self.image_size = self.clip.config.vision_config.image_size

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image_features = clip_image_features(self.clip, clip_preprocess(images, self.image_size))
        text_features = clip_text_features(self.clip, self.tokenizer, prompts, self.device)
        return clip_score(image_features.float(), text_features.float(), self.weight)
