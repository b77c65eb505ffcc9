"""The ShapesWorld verifiable reward: detect the objects, check the caption's constraints (GenEval-style).

The caption is parsed by :func:`diffalign.world.captions.parse_caption`; the image goes through the
deterministic detector :func:`diffalign.world.detector.detect_batch`. A "kind" is a (colour, shape) pair. The
constraints of a caption, in order:

1. ``present``  — per noun phrase: at least one detected object of its kind;
2. ``count``    — counting captions only: exactly N objects of the kind ("three blue squares": N = 3);
3. ``size``     — per noun phrase that names a size: at least one object of its kind, all of that size;
4. ``relation`` — relation captions only: some object of the first kind and some of the second whose
   detected centroids satisfy the relation by ``relation_margin_px`` pixels ("left of": x smaller by the
   margin; "above": y smaller, y pointing down);
5. ``exact``    — the multiset of detected kinds equals the caption's: no missing, duplicate or extra objects.

``score`` is the fraction of constraints met, in [0, 1]; ``strict`` (all met) is the GenEval-style accuracy.
So for "a red circle": a red circle alone scores 1, two red circles or a red circle beside a blue square 1/2,
a blue circle or an empty image 0. A caption outside the grammar raises (a :class:`RewardError` through the
base class), never a silent zero.

Images that are not 32×32 are resized to 32×32 (bilinear, antialiased) before detection.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from diffalign.rewards.base import Reward, RewardError, RewardOutput
from diffalign.rewards.registry import register
from diffalign.world.captions import Caption, parse_caption, relation_holds
from diffalign.world.detector import Detection, detect_batch
from diffalign.world.scenes import IMAGE_SIZE

RELATION_MARGIN_PX = 2.0


def expected_kinds(caption: Caption) -> Counter:
    """The multiset of (colour, shape) a scene must hold to match ``caption``."""
    return Counter({phrase.kind: phrase.count for phrase in caption.objects})


def check_caption(
    caption: Caption, detections: Sequence[Detection], relation_margin_px: float = RELATION_MARGIN_PX
) -> list[tuple[str, bool]]:
    """The caption's constraints (see the module docstring) as (description, satisfied) pairs."""
    by_kind: dict[tuple[str, str], list[Detection]] = {}
    for det in detections:
        by_kind.setdefault(det.kind, []).append(det)
    results: list[tuple[str, bool]] = []
    for phrase in caption.objects:
        found = by_kind.get(phrase.kind, [])
        name = f"{phrase.colour} {phrase.shape}"
        results.append((f"present: {name}", len(found) >= 1))
        if caption.family == "counting":
            results.append((f"count: {phrase.count} x {name}", len(found) == phrase.count))
        if phrase.size is not None:
            results.append((f"size: {phrase.size} {name}", bool(found) and all(d.size == phrase.size for d in found)))
    if caption.relation is not None:
        first, second = (by_kind.get(p.kind, []) for p in caption.objects)
        margin = relation_margin_px
        holds = any(relation_holds(caption.relation, a.centre, b.centre, margin) for a in first for b in second)
        results.append((f"relation: {caption.text}", holds))
    exact = Counter(d.kind for d in detections) == expected_kinds(caption)
    results.append(("exact: no missing, duplicate or extra objects", exact))
    return results


@lru_cache(maxsize=4096)
def _parse(prompt: str) -> Caption:
    return parse_caption(prompt)


def _to_world_size(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` → ``[B, 3, 32, 32]`` (unchanged when already 32×32)."""
    if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    resized = F.interpolate(images.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    return resized.clamp(0, 1)


@register("shapes")
class ShapesReward(Reward):
    """Fraction of the caption's constraints met by the detected objects (module docstring), in [0, 1].

    Args:
        device: where the returned scores live (detection runs in numpy on the CPU).
        relation_margin_px: how many pixels the centroids must differ by for a spatial relation to hold.
    """

    name = "shapes"
    differentiable = False
    needs_prompts = True

    def __init__(self, device: str | torch.device = "cpu", relation_margin_px: float = RELATION_MARGIN_PX):
        super().__init__(device)
        if relation_margin_px < 0:
            raise ValueError(f"relation_margin_px must be >= 0, got {relation_margin_px}")
        self.relation_margin_px = relation_margin_px

    def constraints(self, images: torch.Tensor, prompts: Sequence[str]) -> list[list[tuple[str, bool]]]:
        """Per image, the (constraint, satisfied) list behind its score: what a person reads to see why."""
        captions = [_parse(p) for p in prompts]  # parse first: a bad prompt fails before any detection
        detections = detect_batch(_to_world_size(images.detach().cpu()))
        return [check_caption(c, d, self.relation_margin_px) for c, d in zip(captions, detections)]

    def _evaluate(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        checks = self.constraints(images, prompts)
        met = [sum(ok for _, ok in c) for c in checks]
        score = torch.tensor([m / len(c) for m, c in zip(met, checks)], dtype=torch.float32, device=self.device)
        strict = torch.tensor([m == len(c) for m, c in zip(met, checks)], dtype=torch.bool, device=self.device)
        return score, strict

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._evaluate(images, prompts)[0]

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score [B] float, strict [B] bool)``: the reward and the GenEval-style all-constraints-met flag.

        Validates its inputs like ``__call__``; failures raise :class:`RewardError` naming the reward.
        """
        self.check_inputs(images, prompts)
        try:
            score, strict = self._evaluate(images, list(prompts))
        except Exception as error:
            raise RewardError(f"reward {self.name!r} failed: {type(error).__name__}: {error}") from error
        return self.check_output(score, len(prompts)), strict

    def output(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        score, strict = self.evaluate(images, prompts)
        return RewardOutput(score, strict=strict)


@register("shapes_count")
class ShapesObjectCount(Reward):
    """The number of objects the ShapesWorld detector finds in the image (the prompt is ignored): a world property
    that is a function of the image alone, for reward models that do not see the caption (RCGD's μ(z_t, t))."""

    name = "shapes_count"
    differentiable = False

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        detections = detect_batch(_to_world_size(images.detach().cpu()))
        return torch.tensor([float(len(d)) for d in detections], dtype=torch.float32, device=self.device)
