"""Model names → Policy: ``tiny``, ``shapes``, ``shapes-turbo``, a local folder, or a hub id (hub ids need the
network or a cache).

``shapes-turbo`` (the few-step ShapesWorld model) is not shipped: it lives in the cache folder
(:func:`cached_model_path`) and is made there on first use by the builder train/ registers
(:func:`register_builder`; models/ sits below train/ and cannot import the recipe itself).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffalign.models.policy import Policy, Schedule
from diffalign.models.shapes import base_model_path
from diffalign.models.tiny import build_tiny_pipeline

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

BUILTIN_MODELS = ("tiny", "shapes", "shapes-turbo")
#: Built-in models that are made on first use and cached, not shipped: name → the command that makes them.
CACHED_MODELS = {"shapes-turbo": "diffalign pretrain shapes-turbo"}
#: Environment variable naming the cache folder (default ``$XDG_CACHE_HOME/diffalign``, else ~/.cache/diffalign).
CACHE_ENV = "DIFFALIGN_CACHE"
#: The files a cached pipeline folder must have to be loaded (anything less is an error, never half-loaded).
PIPELINE_FILES = (
    "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json",
)

_builders: dict[str, Callable[[Path], Path]] = {}


def cache_dir() -> Path:
    """The folder cached models live in: ``$DIFFALIGN_CACHE``, else ``$XDG_CACHE_HOME/diffalign``, else
    ``~/.cache/diffalign``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "diffalign"


def cached_model_path(name: str) -> Path:
    """The cache folder of the built-in model ``name`` (one of :data:`CACHED_MODELS`), whether or not it exists."""
    if name not in CACHED_MODELS:
        raise ValueError(f"{name!r} is not a cached built-in model (those are: {', '.join(CACHED_MODELS)})")
    return cache_dir() / name


def missing_pipeline_files(path: Path) -> list[str]:
    """The :data:`PIPELINE_FILES` that ``path`` lacks (all of them when it does not exist)."""
    return [name for name in PIPELINE_FILES if not (path / name).is_file()]


def register_builder(name: str, build: Callable[[Path], Path]) -> None:
    """Registers how the cached model ``name`` is made: ``build(folder)`` writes the complete pipeline to
    ``folder`` and returns it. train/ registers its recipes (``diffalign.train`` does so on import)."""
    if name not in CACHED_MODELS:
        raise ValueError(f"{name!r} is not a cached built-in model (those are: {', '.join(CACHED_MODELS)})")
    _builders[name] = build


def cached_model(name: str) -> Path:
    """The complete cache folder of ``name``, made first (by its registered builder) when missing.

    A folder that exists but lacks pipeline files (:data:`PIPELINE_FILES`) is an error naming them: it is
    neither loaded nor silently overwritten.
    """
    path = cached_model_path(name)
    if path.exists():
        missing = missing_pipeline_files(path)
        if missing:
            raise FileNotFoundError(
                f"the cached model {name!r} at {path} is incomplete (missing: {', '.join(missing)}); delete the "
                f"folder to have it made again, or run `{CACHED_MODELS[name]}`")
        return path
    if name not in _builders:
        raise FileNotFoundError(
            f"the model {name!r} is not in the cache ({path}); make it with `{CACHED_MODELS[name]}`, or "
            f"`import diffalign.train` first so that it is made here on first use")
    return _builders[name](path)


def resolve_model(name: str) -> str:
    """Checks a model name and returns it, or the folder it names; raises ValueError naming the fix."""
    if name in BUILTIN_MODELS:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise ValueError(f"model folder {str(path)!r} has no unet/ subfolder: not a Stable-Diffusion-format pipeline")
        return str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    raise ValueError(
        f"model {name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), an existing pipeline folder, "
        "nor a hub id of the form 'org/name'"
    )


def load_policy(name: str, revision: str | None = None) -> Policy:
    """Loads the policy named ``name`` on the CPU in fp32 (move it with ``.to(device)``)."""
    source = resolve_model(name)
    if source == "tiny":
        return Policy.from_pipeline(build_tiny_pipeline())
    if source == "shapes":
        source = str(base_model_path())
    elif source in CACHED_MODELS:
        source = str(cached_model(source))
    kwargs = dict(revision=revision) if revision else {}
    return Policy(
        UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs),
        AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs),
        CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs),
        CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
        Schedule.from_scheduler_config(DDIMScheduler.load_config(source, subfolder="scheduler", **kwargs)),
    )
