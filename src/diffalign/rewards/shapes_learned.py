"""A learned, differentiable ShapesWorld reward: a small caption-conditioned CNN that regresses the verifiable
reward's score (:mod:`diffalign.rewards.shapes`, the fraction of the caption's constraints met).

Why: value-gradient methods and reward guidance need ``∂reward/∂image``, which the detector behind ``shapes`` does
not give. The learned reward is also a *proxy*: optimising it hard can find images it overrates, and the
verifiable reward exposes that hacking (compare ``shapes_learned`` with ``shapes`` on the same samples).

Caption encoding (:func:`encode_caption`): no tokenizer; the caption is parsed by
:func:`diffalign.world.parse_caption` and written as a fixed vector of :data:`CAPTION_DIM` = 38 numbers —
family one-hot (4), then per noun-phrase slot (two slots; the second is empty for single/counting captions)
a "slot used" bit, colour one-hot (4), shape one-hot (3), size one-hot (unsaid/small/large, 3) and count
one-hot (1–4, 4), then the relation one-hot (4; all zero outside relation captions).

Network (:class:`ShapesRewardModel`, 0.22 M parameters, 0.9 MB in fp32): the image with two coordinate channels
(CoordConv, so positions are visible to the convolutions) goes through four 3×3 convolutions (widths 32, 48, 64,
96; strides 2, 1, 2, 1: 32×32 in, 8×8 out), each followed by GroupNorm, FiLM (a per-channel scale and shift
computed from the caption vector, Perez et al. 2018) and SiLU; the head reads the average and max pools of the
last feature map, the spatial soft-argmax positions of 16 of its channels (Levine et al. 2016: where things are,
for the relations) and the caption vector, through a two-layer MLP to one logit. ``score = sigmoid(logit)``.

Training (:mod:`diffalign.train.reward_training`) is binary cross-entropy against the verifiable score of freshly
rendered positive and perturbed scenes with blur/noise augmentation; its agreement report ships beside the
weights (``rewards/assets/shapes-reward-eval.json``). The shipped weights reach, on 1000 fresh degraded pairs per
caption split, Pearson 0.93 (train captions) / 0.90 (held-out captions) with the verifiable score and a mean
absolute error of 0.09 / 0.10. They have seen rendered and degraded scenes only, never diffusion samples: trust
the verifiable reward, not this one, to say whether a model got better.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.rewards.base import Reward, RewardError
from diffalign.rewards.registry import register
from diffalign.world.captions import COUNT_WORDS, FAMILIES, RELATIONS, Caption, parse_caption
from diffalign.world.scenes import COLOURS, IMAGE_SIZE, SHAPES, SIZES

WEIGHTS_RESOURCE = "assets/shapes-reward.safetensors"
"""The shipped weights, relative to the ``diffalign.rewards`` package."""

_SIZE_SLOTS: tuple[str | None, ...] = (None, *SIZES)
_COUNTS = tuple(sorted({1, *COUNT_WORDS.values()}))
_SLOT_DIM = 1 + len(COLOURS) + len(SHAPES) + len(_SIZE_SLOTS) + len(_COUNTS)
CAPTION_DIM = len(FAMILIES) + 2 * _SLOT_DIM + len(RELATIONS)
"""Length of :func:`encode_caption`'s vector (38)."""


def encode_caption(caption: str | Caption) -> torch.Tensor:
    """The structured caption vector ``[CAPTION_DIM]`` (module docstring); ``ValueError`` outside the grammar."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    vector = torch.zeros(CAPTION_DIM)
    vector[FAMILIES.index(spec.family)] = 1
    for slot, phrase in enumerate(spec.objects):
        offset = len(FAMILIES) + slot * _SLOT_DIM
        hot = [
            0,
            1 + tuple(COLOURS).index(phrase.colour),
            1 + len(COLOURS) + SHAPES.index(phrase.shape),
            1 + len(COLOURS) + len(SHAPES) + _SIZE_SLOTS.index(phrase.size),
            1 + len(COLOURS) + len(SHAPES) + len(_SIZE_SLOTS) + _COUNTS.index(phrase.count),
        ]
        vector[[offset + h for h in hot]] = 1
    if spec.relation is not None:
        vector[len(FAMILIES) + 2 * _SLOT_DIM + RELATIONS.index(spec.relation)] = 1
    return vector


@lru_cache(maxsize=4096)
def _cached_encoding(prompt: str) -> torch.Tensor:
    return encode_caption(prompt)


def encode_captions(prompts: Sequence[str]) -> torch.Tensor:
    """Caption vectors ``[B, CAPTION_DIM]`` of a batch of prompts (cached per prompt)."""
    return torch.stack([_cached_encoding(p) for p in prompts])


class FiLMConv(nn.Module):
    """3×3 convolution → GroupNorm → FiLM ``(1 + γ(c))·h + β(c)`` → SiLU.

    ``x [B, C_in, H, W]`` and the caption embedding ``c [B, cond_dim]`` → ``[B, C_out, H / stride, W / stride]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, cond_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(8, out_channels)
        self.film = nn.Linear(cond_dim, 2 * out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        return F.silu((1 + gamma) * self.norm(self.conv(x)) + beta)


class ShapesRewardModel(nn.Module):
    """Images ``[B, 3, 32, 32]`` in [0, 1] and caption vectors ``[B, CAPTION_DIM]`` → logits ``[B]``.

    :meth:`score` is ``sigmoid(logit)``, the predicted fraction of constraints met (module docstring).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 48, 64, 96),
        strides: tuple[int, ...] = (2, 1, 2, 1),
        cond_hidden: int = 128,
        keypoints: int = 16,
        head_hidden: int = 128,
    ):
        super().__init__()
        self.cond = nn.Sequential(nn.Linear(CAPTION_DIM, cond_hidden), nn.SiLU(), nn.Linear(cond_hidden, cond_hidden))
        channels = (3 + 2, *widths)
        self.blocks = nn.ModuleList(
            FiLMConv(cin, cout, stride, cond_hidden) for cin, cout, stride in zip(channels, widths, strides)
        )
        self.keypoints = nn.Conv2d(widths[-1], keypoints, 1)
        features = 2 * widths[-1] + 2 * keypoints + CAPTION_DIM
        self.head = nn.Sequential(nn.Linear(features, head_hidden), nn.SiLU(), nn.Linear(head_hidden, 1))
        ramp = torch.linspace(-1, 1, IMAGE_SIZE)
        self.register_buffer("coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="xy")), persistent=False)

    def forward(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        cond = self.cond(captions)
        h = torch.cat([images * 2 - 1, self.coords.expand(b, -1, -1, -1)], dim=1)  # (B, 5, 32, 32)
        for block in self.blocks:
            h = block(h, cond)  # ends (B, C, 8, 8)
        attention = self.keypoints(h).flatten(2).softmax(-1)  # (B, K, HW): spatial soft-argmax
        grid = F.interpolate(self.coords[None], size=h.shape[-2:], mode="bilinear", align_corners=False)
        points = torch.einsum("bkn,cn->bkc", attention, grid[0].flatten(1)).flatten(1)  # (B, 2K)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3)), points, captions], dim=1)
        return self.head(pooled).squeeze(1)

    def score(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Predicted fraction of constraints met ``[B]`` in (0, 1)."""
        return torch.sigmoid(self.forward(images, captions))


def default_weights_path() -> Path:
    """Path of the weights shipped with diffalign (``diffalign/rewards/assets/shapes-reward.safetensors``)."""
    return Path(str(resources.files("diffalign.rewards").joinpath(WEIGHTS_RESOURCE)))


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesRewardModel:
    """A :class:`ShapesRewardModel` with weights from ``path`` (default: the shipped file), strictly loaded, in
    eval mode. Raises :class:`RewardError` naming the file when it is missing or does not match the network."""
    from safetensors.torch import load_file

    path = Path(path).expanduser() if path is not None else default_weights_path()
    if not path.is_file():
        raise RewardError(
            f"reward 'shapes_learned': weights file {str(path)!r} not found; train one with "
            "diffalign.train.reward_training.train_reward_model or reinstall diffalign (it ships "
            f"diffalign/rewards/{WEIGHTS_RESOURCE})"
        )
    try:
        state = load_file(str(path))
    except Exception as error:
        raise RewardError(
            f"reward 'shapes_learned': {str(path)!r} is not a readable safetensors file: {error}"
        ) from error
    model = ShapesRewardModel()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RewardError(
            f"reward 'shapes_learned': {str(path)!r} does not match ShapesRewardModel (keys/shapes differ: {error}); "
            "give weights written by train_reward_model for this version of diffalign"
        ) from error
    return model.to(device).eval()


@register("shapes_learned")
class LearnedShapesReward(Reward):
    """The learned ShapesWorld reward: predicted fraction of the caption's constraints met, in (0, 1); differentiable.

    Args:
        device: where the network runs.
        weights: a safetensors file written by ``train_reward_model``; default the shipped weights.

    Images that are not 32×32 are resized to 32×32 (bilinear, antialiased; differentiable) as ``shapes`` does.
    A caption outside the grammar raises :class:`RewardError`.
    """

    name = "shapes_learned"
    differentiable = True
    needs_prompts = True

    def __init__(self, device: str | torch.device = "cpu", weights: str | Path | None = None):
        super().__init__(device)
        self.weights = Path(weights).expanduser() if weights is not None else default_weights_path()
        self.model = load_model(self.weights, self.device).requires_grad_(False)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        try:
            captions = encode_captions(prompts).to(self.device)
        except ValueError as error:
            raise RewardError(f"reward {self.name!r}: {error}") from error
        images = images.float()
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        return self.model.score(images, captions)
