"""The Reward contract (DESIGN.md "Contracts").

A reward is called with ``images`` — a float tensor ``[B, 3, H, W]`` in ``[0, 1]`` — and ``prompts`` — a
list of ``B`` strings — and returns a float tensor ``[B]``. It declares whether it is differentiable and
receives its device at construction. Bad input and bad output (NaN, inf, wrong shape, an exception inside the
scorer) raise :class:`RewardError` naming the reward: a failing reward never becomes a silent zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_RANGE_TOLERANCE = 1e-4


class RewardError(RuntimeError):
    """A reward was given bad input, failed, or returned a non-finite value."""


class Reward:
    """Base class: subclasses set ``name``/``differentiable`` and implement :meth:`score`.

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
        """Raises :class:`RewardError` unless ``rewards`` is a finite float tensor ``[batch_size]``."""
        if not isinstance(rewards, torch.Tensor):
            raise RewardError(f"reward {self.name!r} returned {type(rewards).__name__}, expected a tensor")
        if rewards.shape != (batch_size,):
            raise RewardError(
                f"reward {self.name!r} returned shape {tuple(rewards.shape)}, expected ({batch_size},)"
            )
        if not torch.isfinite(rewards).all():
            bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
            raise RewardError(f"reward {self.name!r} returned non-finite values at indices {bad}: {rewards.tolist()}")
        return rewards.float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r})"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] floats in [0, 1] → uint8 NHWC, by ×255, round and clamp (as DDPO converts)."""
    return (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
