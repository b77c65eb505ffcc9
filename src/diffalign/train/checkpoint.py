"""Checkpoints: the full training state for an exact resume, plus the LoRA in diffusers format.

``checkpoints/<epoch>/`` holds ``trainable.safetensors`` (the trained parameters only: the LoRA, or the whole
UNet when fine-tuning it), ``optimizer.pt``, ``trainer_state.json`` (epochs done, optimizer steps, stat
tracker buffers) and ``lora/pytorch_lora_weights.safetensors`` (loadable with ``pipe.load_lora_weights``).
Sampling noise, prompts and shuffles derive from (seed, epoch, index), so no RNG state needs saving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffalign.models.lora import has_lora, save_lora


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    epochs_done: int = 0
    global_step: int = 0
    stat_tracker: dict | None = None
    extra: dict = field(default_factory=dict)


def trainable_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in unet.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, unet: nn.Module, optimizer, state: TrainerState) -> Path:
    """Writes a checkpoint folder (call on the main process only)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(unet), directory / "trainable.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=1))
    if has_lora(unet):
        save_lora(unet, directory / "lora")
    return directory


def latest_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest ``checkpoints/<epoch>`` of the run folder ``path``."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    candidates = sorted((p for p in (path / "checkpoints").glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    if not candidates:
        raise ValueError(f"resume: {str(path)!r} is neither a checkpoint folder nor a run folder with checkpoints/")
    return candidates[-1]


def load_checkpoint(directory: Path, unet: nn.Module, optimizer) -> TrainerState:
    """Loads weights and optimizer state saved by :func:`save_checkpoint` into ``unet`` and ``optimizer``."""
    weights = load_file(directory / "trainable.safetensors")
    expected = {name for name, p in unet.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise ValueError(
            f"checkpoint {str(directory)!r} does not match this model's trainable parameters "
            f"(missing e.g. {missing}, unexpected e.g. {unexpected}); resume with the config it was saved with"
        )
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
    return TrainerState(**json.loads((directory / "trainer_state.json").read_text()))
