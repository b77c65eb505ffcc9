"""Checkpoints: the full training state for an exact resume, plus the LoRA in diffusers format.

``checkpoints/<epoch>/`` holds ``trainable.safetensors`` (the trained parameters only: the LoRA, or the whole
UNet when fine-tuning it), ``modules/<name>.safetensors`` (a method's extra networks, e.g. value or flow),
``optimizer.pt``, ``trainer_state.json`` (epochs done, optimizer steps, the base model's evaluation and the
method's own state: trackers, coefficients), ``lora/pytorch_lora_weights.safetensors`` (loadable with
``pipe.load_lora_weights``) and ``manifest.json`` (every other file with its size in bytes and sha256). Sampling
noise, prompts and shuffles derive from (seed, epoch, index), so no RNG state needs saving.

Crash safety: a checkpoint is written into ``checkpoints/.partial-<epoch>-*`` beside its final place, every file
and folder fsynced, the manifest last, then renamed to ``checkpoints/<epoch>`` in one step (and the parent folder
fsynced). A run killed at any moment leaves complete checkpoints and at most a ``.partial-*`` folder, which
resuming ignores and the next save deletes. Loading verifies the manifest before reading anything, so a truncated
or corrupted checkpoint is named and never loaded half-way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffalign.models.lora import has_lora, save_lora

log = logging.getLogger("diffalign.train")

MANIFEST = "manifest.json"
#: Name prefix of a checkpoint being written (or left by a run killed while writing it).
PARTIAL_PREFIX = ".partial-"
#: Free space a run needs before it starts, as a multiple of its estimated checkpoint size.
DISK_SAFETY_FACTOR = 2


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, truncated or corrupted (the message names the folder and the file)."""


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    epochs_done: int = 0
    global_step: int = 0
    algorithm: dict = field(default_factory=dict)
    base_evaluation: dict[str, float] | None = None


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def _fsync(path: Path) -> None:
    """Flushes a file's or a folder's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_and_sha256(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_files(directory: Path, unet: nn.Module, modules: dict[str, nn.Module], optimizer,
                 state: TrainerState) -> None:
    save_file(trainable_state(unet), directory / "trainable.safetensors")
    for name, module in modules.items():
        (directory / "modules").mkdir(exist_ok=True)
        save_file(trainable_state(module), directory / "modules" / f"{name}.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    if has_lora(unet):
        save_lora(unet, directory / "lora")


def _seal(directory: Path) -> None:
    """fsyncs every file and folder under ``directory``, then writes and fsyncs ``manifest.json`` listing the files."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        _fsync(path)
        files[path.relative_to(directory).as_posix()] = _size_and_sha256(path)
    with (directory / MANIFEST).open("w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for folder in [*(p for p in directory.rglob("*") if p.is_dir()), directory]:
        _fsync(folder)


def checkpoint_folders(run_checkpoints: Path) -> list[Path]:
    """The ``<epoch>`` folders of a run's ``checkpoints/``, oldest first (``.partial-*`` folders are not among them)."""
    return sorted((p for p in run_checkpoints.glob("*") if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name))


def _remove_partial(parent: Path) -> None:
    for leftover in parent.glob(f"{PARTIAL_PREFIX}*"):
        log.info("checkpoint: deleting %s, left by a run stopped while writing a checkpoint", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _prune(directory: Path, keep_last: int) -> None:
    """Deletes the checkpoints older than ``directory`` but the newest ``keep_last - 1`` of them."""
    older = [p for p in checkpoint_folders(directory.parent) if int(p.name) < int(directory.name)]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old)


def save_checkpoint(directory: Path, unet: nn.Module, modules: dict[str, nn.Module], optimizer,
                    state: TrainerState, keep_last: int | None = None) -> Path:
    """Writes the checkpoint folder ``directory`` (``.../checkpoints/<epoch>``) atomically, then keeps only the
    newest ``keep_last`` checkpoints (None or 0: all). Call on the main process only."""
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_partial(parent)
    partial = parent / f"{PARTIAL_PREFIX}{directory.name}-{os.getpid()}"
    partial.mkdir()
    _write_files(partial, unet, modules, optimizer, state)
    _seal(partial)
    stale = None
    if directory.exists():  # re-saving an epoch (resumed from an older checkpoint): move the old one aside first
        stale = parent / f"{PARTIAL_PREFIX}{directory.name}-replaced-{os.getpid()}"
        os.replace(directory, stale)
    os.replace(partial, directory)
    _fsync(parent)
    if stale is not None:
        shutil.rmtree(stale)
    if keep_last:
        _prune(directory, keep_last)
    return directory


def verify_checkpoint(directory: Path) -> dict[str, dict]:
    """Checks every file ``manifest.json`` lists (present, its size, its sha256); returns the listed files.
    Raises :class:`CheckpointError` naming the folder and the file."""
    where = f"checkpoint {str(directory)!r}"
    if not (directory / MANIFEST).is_file():
        raise CheckpointError(f"{where} has no {MANIFEST}: it is incomplete (the run stopped while writing it) or "
                              "was written by a diffalign without manifests; resume from another checkpoint")
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
        files = {str(name): {"bytes": int(entry["bytes"]), "sha256": str(entry["sha256"])}
                 for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{where}: {MANIFEST} is unreadable ({error!r})") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{where}: {name} is missing (listed in {MANIFEST})")
        actual = _size_and_sha256(path)
        if actual["bytes"] != expected["bytes"]:
            raise CheckpointError(f"{where}: {name} has {actual['bytes']} bytes, {MANIFEST} says {expected['bytes']} "
                                  "(truncated or overwritten)")
        if actual["sha256"] != expected["sha256"]:
            raise CheckpointError(f"{where}: {name} does not match its sha256 in {MANIFEST} (corrupted)")
    return files


def _is_checkpoint(path: Path) -> bool:
    return ((path / MANIFEST).is_file() or (path / "trainer_state.json").is_file()
            or (path.name.isdigit() and path.parent.name == "checkpoints"))


def latest_checkpoint(path: str | Path, fallback: bool = False) -> Path:
    """``path`` itself if it is a checkpoint, else the newest ``checkpoints/<epoch>`` of the run folder ``path``;
    verified (:func:`verify_checkpoint`). ``.partial-*`` folders are ignored. When the newest checkpoint of a run
    folder fails verification this raises, or with ``fallback`` logs why and tries the next older one."""
    path = Path(path)
    if _is_checkpoint(path):
        verify_checkpoint(path)
        return path
    candidates = checkpoint_folders(path / "checkpoints")
    if not candidates:
        raise ValueError(f"resume: {str(path)!r} is neither a checkpoint folder nor a run folder with checkpoints/")
    reasons = []
    for candidate in reversed(candidates):
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError as error:
            if not fallback:
                raise CheckpointError(f"resume: {error}. To resume from the newest complete checkpoint before it "
                                      "instead, set resume_fallback=True (--resume-fallback)") from None
            log.warning("resume: skipping %s: %s", candidate, error)
            reasons.append(str(error))
    raise CheckpointError(f"resume: no complete checkpoint in {str(path / 'checkpoints')!r}: " + "; ".join(reasons))


def _checked_weights(directory: Path, name: str, module: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """The weights in ``directory / name``, checked against ``module``'s trainable parameters (names and shapes)."""
    weights = load_file(directory / name)
    expected = {n: p.shape for n, p in module.named_parameters() if p.requires_grad}
    if set(weights) != set(expected):
        missing, unexpected = sorted(set(expected) - set(weights))[:3], sorted(set(weights) - set(expected))[:3]
        raise CheckpointError(
            f"checkpoint {str(directory)!r}: {name} does not match this {what}'s trainable parameters "
            f"(missing e.g. {missing}, unexpected e.g. {unexpected}); resume with the config it was saved with"
        )
    wrong = [n for n, value in weights.items() if value.shape != expected[n]][:3]
    if wrong:
        raise CheckpointError(f"checkpoint {str(directory)!r}: {name} has other shapes than this {what} for "
                              f"e.g. {wrong}; resume with the config it was saved with")
    return weights


def load_checkpoint(directory: Path, unet: nn.Module, modules: dict[str, nn.Module], optimizer) -> TrainerState:
    """Loads what :func:`save_checkpoint` wrote into ``unet``, the method's ``modules`` and ``optimizer``, after
    verifying the manifest and reading and checking every part: on any error nothing has been changed."""
    files = verify_checkpoint(directory)
    needed = ["trainable.safetensors", "optimizer.pt", "trainer_state.json",
              *(f"modules/{name}.safetensors" for name in modules)]
    for name in needed:
        if name not in files:
            raise CheckpointError(f"checkpoint {str(directory)!r} has no {name} (the method's modules: "
                                  f"{sorted(modules) or 'none'})")
    weights = [(unet, _checked_weights(directory, "trainable.safetensors", unet, "model"))]
    weights += [(module, _checked_weights(directory, f"modules/{name}.safetensors", module, f"{name} module"))
                for name, module in modules.items()]
    state = TrainerState(**json.loads((directory / "trainer_state.json").read_text()))
    # load_state_dict checks the parameter groups before it changes anything
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
    for module, values in weights:
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
    return state


def checkpoint_bytes(modules: list[nn.Module], optimizer) -> int:
    """Estimated size of one checkpoint: the trainable weights of ``modules`` plus the optimizer's state (its
    tensors when it has any, else two moments per weight, as Adam keeps)."""
    weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad)
    moments = sum(v.numel() * v.element_size() for s in optimizer.state_dict()["state"].values()
                  for v in s.values() if torch.is_tensor(v))
    return weights + (moments or 2 * weights)


def check_disk_space(run_path: Path, needed_bytes: int) -> None:
    """Raises when the filesystem of ``run_path`` has less free space than :data:`DISK_SAFETY_FACTOR` checkpoints
    of ``needed_bytes``."""
    existing = next(p for p in [run_path, *run_path.absolute().parents] if p.exists())
    free, wanted = shutil.disk_usage(existing).free, DISK_SAFETY_FACTOR * needed_bytes
    if free < wanted:
        raise OSError(f"not enough disk space for a checkpoint in {str(run_path)!r}: {free / 2**20:.1f} MiB free on "
                      f"its filesystem, {wanted / 2**20:.1f} MiB needed (a checkpoint of about "
                      f"{needed_bytes / 2**20:.1f} MiB: trainable weights and optimizer state, × "
                      f"{DISK_SAFETY_FACTOR} for safety); free some space or choose another run_dir")
