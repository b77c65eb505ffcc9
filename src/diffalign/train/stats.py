"""Advantage normalisation: DDPO's per-prompt stat tracker and the whole-batch z-score."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch


def batch_advantages(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(r − mean) / (std + eps) over the whole batch (population std, as DDPO's numpy code)."""
    rewards = rewards.double()
    return ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)).float()


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
