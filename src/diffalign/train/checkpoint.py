"""Checkpoints: the full training state for an exact resume, plus the LoRA in diffusers format.

``checkpoints/<epoch>/`` holds ``trainable.safetensors`` (the trained parameters only: the LoRA, or the whole
UNet when fine-tuning it), ``modules/<name>.safetensors`` (a method's extra networks, e.g. value or flow),
``optimizer.pt``, ``trainer_state.json`` (epochs done, optimizer steps, the base model's evaluation and the
method's own state: trackers, coefficients) and ``lora/pytorch_lora_weights.safetensors`` (loadable with
``pipe.load_lora_weights``). Sampling noise, prompts and shuffles derive from (seed, epoch, index), so no RNG
state needs saving.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
    algorithm: dict = field(default_factory=dict)
    base_evaluation: dict[str, float] | None = None


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, unet: nn.Module, modules: dict[str, nn.Module], optimizer,
                    state: TrainerState) -> Path:
    """Writes a checkpoint folder (call on the main process only)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(unet), directory / "trainable.safetensors")
    for name, module in modules.items():
        (directory / "modules").mkdir(exist_ok=True)
        save_file(trainable_state(module), directory / "modules" / f"{name}.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
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


def _load_trainable(path: Path, module: nn.Module, what: str) -> None:
    weights = load_file(path)
    expected = {name for name, p in module.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise ValueError(
            f"checkpoint {str(path.parent)!r} does not match this {what}'s trainable parameters "
            f"(missing e.g. {missing}, unexpected e.g. {unexpected}); resume with the config it was saved with"
        )
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load_checkpoint(directory: Path, unet: nn.Module, modules: dict[str, nn.Module], optimizer) -> TrainerState:
    """Loads what :func:`save_checkpoint` wrote into ``unet``, the method's ``modules`` and ``optimizer``."""
    _load_trainable(directory / "trainable.safetensors", unet, "model")
    for name, module in modules.items():
        path = directory / "modules" / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"checkpoint {str(directory)!r} has no weights for the method's module {name!r}")
        _load_trainable(path, module, f"{name} module")
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
    return TrainerState(**json.loads((directory / "trainer_state.json").read_text()))
