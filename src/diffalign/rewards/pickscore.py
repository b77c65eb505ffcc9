"""PickScore: a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences (Kirstain et al. 2023).

Provenance: the ``yuvalkirstain/PickScore`` README: processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, model
``yuvalkirstain/PickScore_v1`` (a ``transformers.CLIPModel``), text padded/truncated to 77 tokens, score
``model.logit_scale.exp() * (E_text · E_image)`` on L2-normalised features (about 18–24 for typical images).

Where the seed repos differ (spec/ddpo_sdpo.md §3.8): SDPO's ``PickScore_scorer`` drops ``logit_scale.exp()`` (its
values are about 0.2) and preprocesses with the OpenAI ViT-L/14 processor on uint8 images. We follow the official
score, scale included, so numbers compare with published ones; an affine rescaling does not change normalised
advantages. Preprocessing is the ViT-H processor's (shorter side 224 bicubic, center crop, CLIP mean/std — the
same constants), done in torch so the reward is differentiable. The tokenizer defaults to OpenAI CLIP's BPE built
offline: the LAION ViT-H tokenizer has the same vocabulary and merges, and padding after the end token does not
change CLIP's causal text features.
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


def pick_score(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) · cos`` per row of ``[B, D]`` features; ``logit_scale`` is CLIP's log-temperature."""
    cosine = (l2_normalize(image_features) * l2_normalize(text_features)).sum(dim=-1)
    return logit_scale.exp() * cosine


@register("pickscore")
class PickScoreReward(Reward):
    """PickScore of each (image, prompt) pair; differentiable.

    Args:
        model: hub id, local folder or ``CLIPModel`` (default ``yuvalkirstain/PickScore_v1``).
        tokenizer: ``None`` for the offline CLIP BPE (same ids as the LAION ViT-H processor), or a tokenizer /
            its folder.
    """

    name = "pickscore"
    differentiable = True
    needs_prompts = True

    def __init__(
        self,
        model: str | Path | CLIPModel = "yuvalkirstain/PickScore_v1",
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        device: str | torch.device = "cpu",
    ):
        super().__init__(device)
        self.clip = load_clip_model(model, self.name, self.device)
        self.tokenizer = load_tokenizer(tokenizer, self.name)
        self.image_size = self.clip.config.vision_config.image_size

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image_features = clip_image_features(self.clip, clip_preprocess(images, self.image_size))
        text_features = clip_text_features(self.clip, self.tokenizer, prompts, self.device)
        return pick_score(image_features.float(), text_features.float(), self.clip.logit_scale.float())
