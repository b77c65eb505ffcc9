"""Advantages from gathered rewards: the whole-batch z-score, DDPO's per-prompt tracker and SDPO's per-(prompt,
step) tracker, plus the settings methods share to choose between them.

Every tracker is checkpointable (``state_dict``/``load_state_dict``), so a resumed run normalises exactly as an
uninterrupted one, and keys prompts by their original string.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AdvantageConfig:
    """How rewards become advantages: per-prompt statistics (DDPO) or the whole gathered batch."""

    per_prompt: bool = True
    """Normalise rewards per prompt with a stat tracker (else over the whole gathered batch)."""
    buffer_size: int = 16
    """Rewards kept per prompt by the stat tracker. Equal to sample.samples_per_prompt, each group is normalised
    only within itself (a revisited prompt never reuses its previous visit's rewards)."""
    min_count: int = 16
    """Below this many buffered rewards a prompt uses the whole batch's statistics."""
    placebo: bool = False
    """Placebo control: permute each prompt's advantages among its samples (same noise and magnitudes, no signal)."""

    def validate(self, prefix: str) -> list[str]:
        if self.buffer_size < 1 or self.min_count < 1:
            return [f"{prefix}.buffer_size and {prefix}.min_count must be >= 1, "
                    f"got {self.buffer_size} and {self.min_count}"]
        return []

    def tracker(self, per_step: bool = False) -> PerPromptStatTracker | PerPromptStepStatTracker | None:
        """A fresh tracker for these settings (None for whole-batch normalisation); ``per_step``: one buffer per
        (prompt, step), for per-step returns ``[B, N]``."""
        if not self.per_prompt:
            return None
        return (PerPromptStepStatTracker if per_step else PerPromptStatTracker)(self.buffer_size, self.min_count)


def batch_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(r − mean) / (std + eps) over the whole batch (population std, as DDPO's numpy code); any shape."""
    rewards = rewards.double()
    return ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)).float()


def normalise(rewards: torch.Tensor, prompts: Sequence[str],
              tracker: PerPromptStatTracker | PerPromptStepStatTracker | None) -> torch.Tensor:
    """Advantages of gathered ``rewards`` ``[B]`` (or per-step ``[B, N]`` with a per-step tracker): the tracker's,
    or the whole-batch z-score without one."""
    return batch_advantages(rewards) if tracker is None else tracker.update(prompts, rewards)


def shuffle_within_groups(values: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """``values`` ``[B, ...]`` with rows permuted at random among the rows of the same prompt (a placebo: each
    group keeps its values, but which sample gets which no longer depends on the sample)."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    order = torch.arange(len(prompts))
    for rows in groups.values():
        rows_t = torch.tensor(rows)
        order[rows_t] = rows_t[torch.randperm(len(rows), generator=generator)]
    return values[order]


def zero_advantage_fraction(advantages: torch.Tensor, prompts: Sequence[str], atol: float = 1e-6) -> float:
    """The fraction of prompt groups whose advantages are all zero (groups that give no gradient)."""
    groups = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    values = advantages.reshape(len(prompts), -1).abs()
    return sum(bool((values[rows] <= atol).all()) for rows in groups.values()) / max(len(groups), 1)


class RewardNormaliser:
    """Advantages ``[B]`` of gathered rewards as an :class:`AdvantageConfig` says (tracker or whole batch, and the
    placebo permutation), with the tracker's state for checkpoints; methods that normalise rewards hold one.
    ``per_step``: of per-step returns ``[B, N]``, tracked per (prompt, step) (SDPO)."""

    def __init__(self, config: AdvantageConfig, per_step: bool = False):
        self.config = config
        self.tracker = config.tracker(per_step)

    def __call__(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        advantages = normalise(rewards, prompts, self.tracker)
        return shuffle_within_groups(advantages, prompts, generator) if self.config.placebo else advantages

    def state_dict(self) -> dict:
        return {"stat_tracker": None if self.tracker is None else self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is not None and state.get("stat_tracker") is not None:
            self.tracker.load_state_dict(state["stat_tracker"])


class PerPromptStatTracker:
    """Per-prompt reward normalisation (DDPO ``stat_tracking.PerPromptStatTracker``).

    Each prompt keeps a buffer of its last ``buffer_size`` rewards. The batch's rewards are appended first; a
    prompt with fewer than ``min_count`` buffered values falls back to the whole batch's mean and std.
    Advantage = (r − mean) / (std + 1e-6). Unlike the reference, the buffers are checkpointed
    (:meth:`state_dict`), so a resumed run normalises exactly as an uninterrupted one, and prompts are keyed by
    their original string rather than a token round-trip.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"stat tracker: buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Appends ``rewards`` ``[B]`` to their prompts' buffers and returns the advantages ``[B]``."""
        values = rewards.detach().double().cpu().numpy()
        prompts = np.array(list(prompts), dtype=object)
        advantages = np.empty_like(values)
        for prompt in dict.fromkeys(prompts.tolist()):
            mask = prompts == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask].tolist())
            pool = np.array(buffer) if len(buffer) >= self.min_count else values
            advantages[mask] = (values[mask] - pool.mean()) / (pool.std() + 1e-6)
        return torch.from_numpy(advantages).float().to(rewards.device)

    def stats(self) -> dict[str, dict[str, float]]:
        """Mean, std and count of every prompt's buffer."""
        return {p: {"mean": float(np.mean(b)), "std": float(np.std(b)), "count": len(b)} for p, b in self.buffers.items()}

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}


class PerPromptStepStatTracker:
    """Per-(prompt, step) normalisation of per-step returns (SDPO ``stat_tracking.PerStepPromptStatTracker``).

    ``update(prompts, returns [B, N])``: each (prompt, step) keeps its last ``buffer_size`` values (all of a
    batch's samples of the prompt go into the same buffer, appended first); with fewer than ``min_count``
    buffered, step j falls back to the whole batch's mean and std at step j. Advantage = (G − mean)/(std + 1e-6).
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"stat tracker: buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, list[deque[float]]] = {}

    def update(self, prompts: Sequence[str], returns: torch.Tensor) -> torch.Tensor:
        """Appends ``returns`` ``[B, N]`` to their (prompt, step) buffers and returns the advantages ``[B, N]``."""
        values = returns.detach().double().cpu().numpy()
        if values.ndim != 2 or values.shape[0] != len(prompts):
            raise ValueError(f"per-step tracker: returns must be [len(prompts), N], got {tuple(values.shape)}")
        prompts = np.array(list(prompts), dtype=object)
        advantages = np.empty_like(values)
        for prompt in dict.fromkeys(prompts.tolist()):
            mask = prompts == prompt
            buffers = self.buffers.setdefault(prompt, [deque(maxlen=self.buffer_size) for _ in range(values.shape[1])])
            if len(buffers) != values.shape[1]:
                raise ValueError(f"per-step tracker: prompt {prompt!r} was tracked with {len(buffers)} steps, "
                                 f"now given {values.shape[1]}")
            for j, buffer in enumerate(buffers):
                buffer.extend(values[mask, j].tolist())
                pool = np.array(buffer) if len(buffer) >= self.min_count else values[:, j]
                advantages[mask, j] = (values[mask, j] - pool.mean()) / (pool.std() + 1e-6)
        return torch.from_numpy(advantages).float().to(returns.device)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: [list(b) for b in steps] for p, steps in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: [deque(v, maxlen=self.buffer_size) for v in steps] for p, steps in state["buffers"].items()}
