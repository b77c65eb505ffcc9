"""HPSv2: Human Preference Score v2 (Wu et al. 2023), an open_clip ViT-H-14 fine-tuned on HPD v2.

Provenance: the ``hpsv2`` package (``hpsv2/img_score.py``): ``create_model_and_transforms('ViT-H-14', ...)`` from its
vendored open_clip, the fine-tuned weights ``checkpoint['state_dict']`` of ``HPS_v2_compressed.pt`` (v2.0) or
``HPS_v2.1_compressed.pt`` (v2.1) from the hub repo ``xswu/HPSv2``, tokenizer ``get_tokenizer('ViT-H-14')``, and
score ``diag(image_features @ text_features.T)`` on the model's normalised features: a plain cosine, no
logit scale (about 0.2–0.3). The eval transform is open_clip's ``ResizeMaxSize`` (``resize_longest_max=True``):
longer side to 224 bicubic, pad to a square with black, CLIP mean/std.

Where the seed repo differs (spec/ddpo_sdpo.md §3.8): SDPO's ``hpsv2_scorer`` computes the same cosine but
preprocesses with the OpenAI ViT-L/14 ``CLIPProcessor`` on uint8 images (shorter side to 224 and center crop).
For square images the two transforms are the same resize; for others we follow HPSv2 (letterbox), in torch, so
the reward is differentiable.

Loading: the HPS checkpoint holds the full model, so the LAION ViT-H-14 download the package also makes is not
needed: we build the architecture from open_clip's bundled config (``pretrained=None``) and load the checkpoint.
open_clip imports torchvision, which is why it is imported in the constructor only. For tests and for CLIP
checkpoints in Hugging Face format, pass a ``transformers.CLIPModel`` as ``model``: the score is the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.rewards.base import Reward, RewardError
from diffalign.rewards.common import (
    CLIP_MEAN,
    CLIP_STD,
    clip_image_features,
    clip_text_features,
    l2_normalize,
    letterbox,
    load_state_dict_file,
    load_tokenizer,
    normalize,
    optional_import,
)
from diffalign.rewards.registry import register

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def hps_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """HPSv2's score: the cosine of each row of ``[B, D]`` image and text features (normalised here), no scale."""
    return (l2_normalize(image_features) * l2_normalize(text_features)).sum(dim=-1)


def hps_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPSv2's eval transform in torch: letterbox to ``size`` (bicubic, black padding), then CLIP mean/std."""
    return normalize(letterbox(images.float(), size, fill=0.0), CLIP_MEAN, CLIP_STD)


def _resolve_checkpoint(checkpoint: str | Path, reward_name: str) -> Path:
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    if str(checkpoint) not in HPS_FILES:
        raise RewardError(
            f"reward {reward_name!r}: checkpoint {str(checkpoint)!r} is neither a file nor one of "
            f"{sorted(HPS_FILES)}; give the path to {' or '.join(HPS_FILES.values())} (from the hub repo {HPS_REPO})"
        )
    from huggingface_hub import hf_hub_download

    filename = HPS_FILES[str(checkpoint)]
    try:
        return Path(hf_hub_download(HPS_REPO, filename))
    except Exception as error:
        raise RewardError(
            f"reward {reward_name!r} could not fetch {filename} from {HPS_REPO} ({type(error).__name__}: {error}); "
            f"download it on a machine with hub access and pass checkpoint='/path/to/{filename}'"
        ) from error


@register("hpsv2")
class HpsV2Reward(Reward):
    """HPSv2 human-preference score of each (image, prompt) pair; differentiable.

    Args:
        checkpoint: path to ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, or ``"v2.0"`` / ``"v2.1"`` to
            fetch it from ``xswu/HPSv2`` (hub access needed). Default ``"v2.0"``, the ``hpsv2`` package's and SDPO's.
        model: an already built model instead: an open_clip CLIP or a ``transformers.CLIPModel`` (tests use a tiny
            one). ``checkpoint`` is then ignored.
        tokenizer: for a ``CLIPModel``: ``None`` (offline CLIP BPE) or a tokenizer; for open_clip: ``None`` for
            ``open_clip.get_tokenizer('ViT-H-14')`` or any callable ``list[str] → LongTensor [B, 77]``.
    """

    name = "hpsv2"
    differentiable = True
    needs_prompts = True

    def __init__(
        self,
        checkpoint: str | Path = "v2.0",
        model: Any = None,
        tokenizer: Any = None,
        device: str | torch.device = "cpu",
    ):
        super().__init__(device)
        from transformers import CLIPModel

        if model is None:
            model = self._load_open_clip(checkpoint)
        self.is_hf = isinstance(model, CLIPModel)
        if self.is_hf:
            self.tokenizer = load_tokenizer(tokenizer, self.name)
            size = model.config.vision_config.image_size
        else:
            if tokenizer is None:
                open_clip = optional_import("open_clip", "open_clip_torch", self.name)
                tokenizer = open_clip.get_tokenizer("ViT-H-14")
            self.tokenizer = tokenizer
            size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.model = model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)

    def _load_open_clip(self, checkpoint: str | Path):
        open_clip = optional_import(
            "open_clip",
            "open_clip_torch",
            self.name,
            " (it imports torchvision: install the torch/torchvision pair built for your platform), or pass "
            "model=<a built model>",
        )
        path = _resolve_checkpoint(checkpoint, self.name)
        state = load_state_dict_file(path, f"reward {self.name!r}", f"Download {path.name} again from {HPS_REPO}.")
        state = state.get("state_dict", state)
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise RewardError(
                f"reward {self.name!r}: {str(path)!r} does not fit open_clip's ViT-H-14 ({error}); give an HPSv2 "
                f"checkpoint ({' or '.join(HPS_FILES.values())})"
            ) from error
        return model

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = hps_preprocess(images, self.image_size)
        if self.is_hf:
            image_features = clip_image_features(self.model, pixels)
            text_features = clip_text_features(self.model, self.tokenizer, prompts, self.device)
        else:
            image_features = self.model.encode_image(pixels)
            text_features = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))
        return hps_score(image_features.float(), text_features.float())
