"""Parameter-free input features the small auxiliary networks share (value, flow and latent-reward networks)."""

from __future__ import annotations

import math

import torch

#: Width of :func:`timestep_features`.
TIME_FEATURES = 32


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features ``[b, TIME_FEATURES]`` of raw timesteps ``[b]`` (DDPM's embedding, periods 1 … 10⁴)."""
    half = TIME_FEATURES // 2
    frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=1)
