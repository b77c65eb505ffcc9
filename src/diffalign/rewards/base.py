"""The Reward contract (DESIGN.md "Contracts").

A reward is called with ``images`` — a float tensor ``[B, 3, H, W]`` in ``[0, 1]`` — and ``prompts`` — a
list of ``B`` strings — and returns a float tensor ``[B]``. It declares whether it is differentiable and
receives its device at construction. Bad input and bad output (NaN, inf, wrong shape, an exception inside the
scorer) raise :class:`RewardError` naming the reward: a failing reward never becomes a silent zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from diffalign.images import to_uint8  # noqa: F401  (re-exported: rewards convert with it)

_RANGE_TOLERANCE = 1e-4


class RewardError(RuntimeError):
    """A reward was given bad input, failed, or returned a non-finite value."""


@dataclass(frozen=True)
class RewardOutput:
    """Everything a reward says about a batch: ``scores`` ``[B]``; ``components``, each member's ``[B]`` values
    for a composite (empty otherwise); ``strict`` ``[B]`` bool, the all-constraints-met flag of a verifiable
    reward (None when the reward has no such notion)."""

    scores: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    strict: torch.Tensor | None = None


class Reward:
    """Base class: subclasses set ``name``/``differentiable`` and implement :meth:`score`.

    ``reward(images, prompts)`` returns the scores ``[B]``; :meth:`output` returns the typed
    :class:`RewardOutput` (scores, components, strict flag) that training and evaluation read.
    ``needs_prompts`` says whether the score depends on the prompt; such rewards reject empty prompts.
    """

    name: str = "reward"
    differentiable: bool = False
    needs_prompts: bool = False

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores a validated batch; returns ``[B]``. Subclasses implement this."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            try:
                rewards = self.score(images.to(self.device), list(prompts))
            except RewardError:
                raise
            except Exception as error:
                raise RewardError(f"reward {self.name!r} failed: {type(error).__name__}: {error}") from error
        return self.check_output(rewards, len(prompts))

    def output(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        """The scores with whatever else this reward knows (subclasses with components or a strict flag override)."""
        return RewardOutput(self(images, prompts))

    def check_inputs(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        """Raises :class:`RewardError` unless images are ``[B, 3, H, W]`` floats in [0, 1] with B prompts."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise RewardError(f"reward {self.name!r}: images must be a tensor [B, 3, H, W], got {shape}")
        if not images.is_floating_point():
            raise RewardError(
                f"reward {self.name!r}: images must be float in [0, 1], got dtype {images.dtype} "
                "(convert uint8 images with images.float() / 255)"
            )
        finite = torch.isfinite(images)
        if not finite.all():
            raise RewardError(
                f"reward {self.name!r}: images hold {int((~finite).sum())} NaN or infinite values (the sampler or the "
                "decoder diverged: check sample.eta, sample.guidance_scale and the learning rate)"
            )
        lo, hi = images.min().item(), images.max().item()
        if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise RewardError(
                f"reward {self.name!r}: images must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}] "
                "(images in [-1, 1] need (x + 1) / 2)"
            )
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            n = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise RewardError(
                f"reward {self.name!r}: expected a list of {images.shape[0]} prompts (one per image), got {n}"
            )
        if self.needs_prompts:
            empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
            if empty:
                raise RewardError(
                    f"reward {self.name!r} scores images against their prompts, but prompts {empty} are empty"
                )

    def check_output(self, rewards: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Raises :class:`RewardError` unless ``rewards`` is a real tensor ``[batch_size]`` (bool, int or float)
        whose values are finite in float32; returns it as float32."""
        if not isinstance(rewards, torch.Tensor):
            raise RewardError(f"reward {self.name!r} returned {type(rewards).__name__}, expected a tensor")
        if rewards.shape != (batch_size,):
            raise RewardError(
                f"reward {self.name!r} returned shape {tuple(rewards.shape)}, expected ({batch_size},)"
            )
        if rewards.is_complex():
            raise RewardError(f"reward {self.name!r} returned complex values (dtype {rewards.dtype}), expected real "
                              "scores")
        scores = rewards.float()  # a float64 beyond float32's range becomes inf here, and is caught below
        if not torch.isfinite(scores).all():
            bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
            raise RewardError(f"reward {self.name!r} returned non-finite values at indices {bad} ({len(bad)} of "
                              f"{batch_size}, as float32): {rewards.tolist()}")
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r})"


