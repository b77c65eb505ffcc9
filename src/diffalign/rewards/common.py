"""Helpers shared by the reward zoo: CLIP-style preprocessing in torch, CLIP features, loading and errors.

Preprocessing is done on the float tensor the reward receives, so gradients flow to the image (the reference
pipelines go through PIL and uint8, which cuts the graph). The resize follows PIL's filters: torch's
``interpolate(..., antialias=True)`` uses PIL's bicubic (a = -0.5) and bilinear kernels for both up- and
down-sampling; on uint8 test images it matches ``CLIPImageProcessor`` to a mean of 0.3/255 per pixel (PIL rounds
to uint8 between its two 1-D passes, we do not).

Heavy optional packages are imported inside constructors through :func:`optional_import`, so that
``import diffalign.rewards`` stays light and a missing package names the reward and the ``pip install`` fix.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffalign.rewards.base import RewardError

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedTokenizerBase

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's per-channel mean (also used by open_clip's ViT-H-14, PickScore, HPSv2 and ImageReward)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's per-channel standard deviation."""
CLIP_MAX_LENGTH = 77
"""CLIP's text context length in tokens."""


class MissingDependencyError(RewardError, ImportError):
    """A reward needs an optional package that is not installed (catchable as RewardError or ImportError)."""


def optional_import(module: str, pip_name: str, reward_name: str, note: str = "") -> ModuleType:
    """Imports ``module`` or raises :class:`MissingDependencyError` naming the reward and the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"reward {reward_name!r} needs the {pip_name!r} package, which is not importable ({error}); "
            f"install it with `pip install {pip_name}`{note}"
        ) from error


# --- preprocessing ---------------------------------------------------------------------------------------------


def resize_shortest_side(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Resizes ``[B, C, H, W]`` so the shorter side is ``size``; the longer is ``int(size * long / short)``.

    That is the output size of torchvision's ``Resize(size)`` and of ``CLIPImageProcessor`` (both truncate).
    Antialiased, PIL-style kernels; bicubic overshoot is clamped back to [0, 1] as PIL's uint8 output is.
    """
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    out_size = (size, new_long) if height <= width else (new_long, size)
    if (height, width) == out_size:
        return images
    resized = F.interpolate(images, size=out_size, mode=mode, antialias=True, align_corners=False)
    return resized.clamp(0, 1)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` window; offsets ``(H - size) // 2`` as in ``CLIPImageProcessor``.

    torchvision's ``CenterCrop`` rounds the offset instead of flooring it: the two differ by one pixel when
    the margin is odd, which never happens for square images.
    """
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot center-crop {size}x{size} from an image of {height}x{width}; resize first")
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """CLIP's eval transform in torch: resize shortest side to ``size`` (bicubic), center crop, normalise.

    Same steps as OpenAI CLIP's ``_transform``, ``CLIPImageProcessor``, ImageReward's ``_transform`` and
    open_clip's eval transform. Input ``[B, 3, H, W]`` in [0, 1]; output ``[B, 3, size, size]``; differentiable.
    """
    images = center_crop(resize_shortest_side(images.float(), size, "bicubic"), size)
    return normalize(images, mean, std)


def letterbox(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """open_clip's ``ResizeMaxSize``: longer side to ``size`` (bicubic, sides rounded), then pad to a square.

    Padding is ``fill`` (0 = black, in [0, 1] units, before normalisation), split as ``pad // 2`` before and the
    rest after, as HPSv2's vendored open_clip does. Identical to :func:`clip_preprocess`'s resize for square input.
    """
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(0, 1)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def l2_normalize(features: torch.Tensor) -> torch.Tensor:
    """Divides each row by its L2 norm; a zero row is left as is (numpy ``a / ||a||`` with norm 0 → 1, as LAION)."""
    norm = features.norm(dim=-1, keepdim=True)
    return features / torch.where(norm == 0, torch.ones_like(norm), norm)


# --- CLIP models and tokenizers ----------------------------------------------------------------------------------


def load_clip_model(model: str | Path | CLIPModel, reward_name: str, device: torch.device) -> CLIPModel:
    """A frozen fp32 ``transformers.CLIPModel`` in eval mode, from a hub id, a local folder or a built model."""
    from transformers import CLIPModel

    if not isinstance(model, CLIPModel):
        try:
            model = CLIPModel.from_pretrained(str(model))
        except Exception as error:  # OSError, ValueError, HF hub errors: all mean "could not load"
            raise RewardError(
                f"reward {reward_name!r} could not load the CLIP model {str(model)!r}: {type(error).__name__}: "
                f"{error}. Give a local folder saved with CLIPModel.save_pretrained, or a hub id on a machine "
                "that can reach the hub (unset HF_HUB_OFFLINE), or pass a CLIPModel instance."
            ) from error
    model = model.to(device=device, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(
    tokenizer: str | Path | PreTrainedTokenizerBase | None, reward_name: str
) -> PreTrainedTokenizerBase:
    """``None`` → OpenAI CLIP's BPE tokenizer built offline (the ids of every CLIP-BPE checkpoint: OpenAI CLIP,
    LAION's ViT-H-14, PickScore); a string → ``AutoTokenizer.from_pretrained``; an instance is used as is."""
    if tokenizer is None:
        from diffalign.models.tokenizer import clip_tokenizer

        return clip_tokenizer(CLIP_MAX_LENGTH)
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        except Exception as error:
            raise RewardError(
                f"reward {reward_name!r} could not load the tokenizer {str(tokenizer)!r}: {error}. "
                "Give a local folder or leave tokenizer=None for the offline CLIP tokenizer."
            ) from error
    return tokenizer


def _features(output) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5.x returns an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_image_features(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings ``[B, projection_dim]`` (``get_image_features``), not normalised."""
    return _features(model.get_image_features(pixel_values=pixel_values))


def clip_text_features(
    model: CLIPModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device
) -> torch.Tensor:
    """Projected CLIP text embeddings ``[B, projection_dim]`` of prompts padded/truncated to 77 tokens."""
    tokens = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=CLIP_MAX_LENGTH, return_tensors="pt"
    )
    return _features(
        model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
    )


# --- weight files -----------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str, fix: str) -> None:
    """Raises :class:`RewardError` when ``path``'s sha256 differs from ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise RewardError(
            f"{what}: {str(path)!r} has sha256 {actual} but the released file has {expected}; the file is "
            f"truncated, corrupt, a Git LFS pointer or a different checkpoint. {fix}"
        )


def load_state_dict_file(path: str | Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors naming the file and the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RewardError(f"{what}: weight file {str(path)!r} does not exist. {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise RewardError(
            f"{what}: could not read {str(path)!r} as a torch state dict with weights_only=True "
            f"({type(error).__name__}: {first_line}). {fix}"
        ) from error
    if not isinstance(state, dict):
        raise RewardError(f"{what}: {str(path)!r} holds a {type(state).__name__}, not a state dict. {fix}")
    return state
