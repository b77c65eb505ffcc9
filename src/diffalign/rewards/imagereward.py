"""ImageReward (Xu et al. 2023): BLIP image–text encoder + MLP head trained on human preference rankings.

Provenance: the ``image-reward`` package (``ImageReward/ImageReward.py``, v1.5).
``ImageReward.load("ImageReward-v1.0")`` builds ``BLIP_Pretrain(image_size=224, vit='large', med_config)`` and
``MLP(768)`` and loads ``ImageReward.pt``. Its differentiable path ``score_gard`` is: BLIP ViT-L visual encoder →
image tokens; the BERT text encoder cross-attends to them; ``last_hidden_state[:, 0]`` → MLP 768→1024→128→64→16→1
(dropout .2/.2/.1, no activations) → ``(r − 0.16717362830052426) / 1.0333394966054072``. Prompts: BLIP's BERT
tokenizer, ``padding='max_length', truncation=True, max_length=35``. Images: Resize 224 bicubic, CenterCrop 224,
CLIP mean/std.

Where the seed repos differ (spec/ddpo_sdpo.md §3.8, spec/dag_dav_rcgd.md §1.9): SDPO's ``ImageReward_scorer``
returns the raw MLP output (no standardisation) and preprocesses uint8 images with the OpenAI ViT-L/14
``CLIPProcessor``; DAG calls ``score_gard`` with the tokenizer's own max length. We follow the package's
``score``: standardised, ``max_length=35``, its transform — done in torch, so the reward is differentiable as
``score_gard`` is.

Loading: the BLIP model code lives in the ``image-reward`` package (it pins old ``timm``/``fairscale`` and imports
OpenAI's ``clip``), so it is imported in the constructor only; without it the constructor says
``pip install image-reward``. :class:`ImageRewardHead` holds the head math alone, testable with random weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffalign.rewards.aesthetic import mlp_head_layers
from diffalign.rewards.base import Reward, RewardError
from diffalign.rewards.common import clip_preprocess, optional_import
from diffalign.rewards.registry import register

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35


class ImageRewardMLP(nn.Module):
    """ImageReward's ``MLP``: ``layers`` = Linear 768→1024, Dropout .2, Linear →128, Dropout .2, Linear →64,
    Dropout .1, Linear →16, Linear →1 (keys ``layers.{0,2,4,6,7}.*``, as ``mlp.layers.*`` in ``ImageReward.pt``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = mlp_head_layers(input_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class ImageRewardHead(nn.Module):
    """BLIP [CLS] features ``[N, 768]`` → standardised ImageReward ``[N]``: ``(mlp(f) − mean) / std``."""

    def __init__(self, input_size: int = 768, mean: float = IMAGEREWARD_MEAN, std: float = IMAGEREWARD_STD):
        super().__init__()
        self.mlp = ImageRewardMLP(input_size)
        self.mean = mean
        self.std = std

    def raw(self, features: torch.Tensor) -> torch.Tensor:
        """The MLP output before standardisation ``[N]`` (what SDPO uses as its reward)."""
        return self.mlp(features).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (self.raw(features) - self.mean) / self.std

    @classmethod
    def from_imagereward_state(cls, state: dict[str, torch.Tensor]) -> ImageRewardHead:
        """The head from a full ``ImageReward.pt`` state dict (its ``mlp.*`` entries), loaded strictly, eval mode."""
        head = cls()
        mlp_state = {key: value for key, value in state.items() if key.startswith("mlp.")}
        try:
            head.load_state_dict(mlp_state, strict=True)
        except RuntimeError as error:
            raise RewardError(
                f"the state dict has no ImageReward head (mlp.layers.{{0,2,4,6,7}}.*): {error}; "
                "give ImageReward.pt from the hub repo THUDM/ImageReward"
            ) from error
        return head.eval()


def blip_cls_features(blip: Any, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """BLIP's text encoder, cross-attending to the image tokens, at the [CLS] position ``[B, 768]`` (``score_gard``)."""
    image_embeds = blip.visual_encoder(pixels)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    text_output = blip.text_encoder(
        input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        return_dict=True,
    )
    return text_output.last_hidden_state[:, 0, :]


@register("imagereward")
class ImageRewardReward(Reward):
    """Standardised ImageReward of each (image, prompt) pair; differentiable (the package's ``score_gard`` path).

    Args:
        model_name_or_path: ``"ImageReward-v1.0"`` (fetched by the package into ``~/.cache/ImageReward``) or the
            path to a local ``ImageReward.pt``.
        med_config: path to BLIP's ``med_config.json``; ``None`` lets the package fetch it from THUDM/ImageReward.
        blip: an already built BLIP-like model instead (``visual_encoder``, ``text_encoder``, ``tokenizer``);
            with ``head``, no package and no download are needed (tests use tiny ones).
        head: the :class:`ImageRewardHead` to use with ``blip``.
    """

    name = "imagereward"
    differentiable = True
    needs_prompts = True

    def __init__(
        self,
        model_name_or_path: str | Path = "ImageReward-v1.0",
        med_config: str | Path | None = None,
        blip: Any = None,
        head: ImageRewardHead | None = None,
        device: str | torch.device = "cpu",
    ):
        super().__init__(device)
        if (blip is None) != (head is None):
            raise RewardError(f"reward {self.name!r}: pass both blip= and head=, or neither (to load the package's)")
        if blip is None:
            blip, head = self._load_package_model(model_name_or_path, med_config)
        self.blip = blip.to(self.device).eval().requires_grad_(False)
        self.head = head.to(self.device).eval().requires_grad_(False)

    def _load_package_model(self, model_name_or_path: str | Path, med_config: str | Path | None):
        package = optional_import("ImageReward", "image-reward", self.name, " (it also needs OpenAI's `clip` module)")
        try:
            config = None if med_config is None else str(med_config)
            model = package.load(str(model_name_or_path), device=str(self.device), med_config=config)
        except Exception as error:
            raise RewardError(
                f"reward {self.name!r} could not load {str(model_name_or_path)!r} with image-reward "
                f"({type(error).__name__}: {error}); give model_name_or_path='/path/to/ImageReward.pt' and "
                "med_config='/path/to/med_config.json' (both from the hub repo THUDM/ImageReward)"
            ) from error
        head = ImageRewardHead.from_imagereward_state({f"mlp.{k}": v for k, v in model.mlp.state_dict().items()})
        return model.blip, head

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = clip_preprocess(images, 224)
        tokens = self.blip.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH, return_tensors="pt"
        )
        features = blip_cls_features(
            self.blip, pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        )
        return self.head(features.float())
