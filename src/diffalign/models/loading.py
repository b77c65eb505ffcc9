"""Model names → Policy: ``tiny``, ``shapes``, ``shapes-turbo``, a local folder, or a hub id (hub ids need the
network or a cache).

``shapes-turbo`` (the few-step ShapesWorld model) is not shipped: it lives in the cache folder
(:func:`cached_model_path`, named after the shipped base it is distilled from, so a new base gets a new student)
and is made there on first use by the builder train/ registers (:func:`register_builder`; models/ sits below
train/ and cannot import the recipe itself).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffalign.models.policy import Policy, Schedule
from diffalign.models.shapes import base_model_path
from diffalign.models.tiny import SD_SCHEDULER_CONFIG, build_tiny_pipeline

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

#: Pipeline classes (``model_index.json``'s ``_class_name``) whose folders load as a Policy: SD 1.x/2.x layouts.
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
#: The config file of each component a pipeline folder must have, and the classes it may declare (None: any).
COMPONENT_CONFIGS = {
    "unet/config.json": ("UNet2DConditionModel",), "vae/config.json": ("AutoencoderKL",),
    "text_encoder/config.json": None, "scheduler/scheduler_config.json": None,
}

_builders: dict[str, Callable[[Path], Path]] = {}


def cache_dir() -> Path:
    """The folder cached models live in: ``$DIFFALIGN_CACHE``, else ``$XDG_CACHE_HOME/diffalign``, else
    ``~/.cache/diffalign``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "diffalign"


@functools.lru_cache(maxsize=4)
def _fingerprint(weights: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(weights, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def base_fingerprint() -> str:
    """The first 12 hex digits of the SHA-256 of the shipped ShapesWorld base's UNet weights."""
    weights = base_model_path() / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    return _fingerprint(weights, stat.st_size, stat.st_mtime_ns)


def cached_model_path(name: str) -> Path:
    """The cache folder of the built-in model ``name`` (one of :data:`CACHED_MODELS`), whether or not it exists:
    ``<cache>/<name>-<fingerprint of the shipped base it is made from>``."""
    if name not in CACHED_MODELS:
        raise ValueError(f"{name!r} is not a cached built-in model (those are: {', '.join(CACHED_MODELS)})")
    return cache_dir() / f"{name}-{base_fingerprint()}"


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


def _read_json(path: Path, folder: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"model folder {str(folder)!r}: {path.relative_to(folder)} is not readable JSON "
                         f"({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"model folder {str(folder)!r}: {path.relative_to(folder)} holds a {type(data).__name__}, "
                         "not a JSON object")
    return data


def check_pipeline_folder(path: Path) -> None:
    """Raises ValueError naming ``path`` unless it holds a Stable-Diffusion-format pipeline: a ``model_index.json``
    of one of :data:`SD_PIPELINES` and each component's config (:data:`COMPONENT_CONFIGS`) of an expected class."""
    if not (path / "unet").is_dir():
        raise ValueError(f"model folder {str(path)!r} has no unet/ subfolder: not a Stable-Diffusion-format pipeline")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"model folder {str(path)!r} has no model_index.json: not a diffusers pipeline folder "
                         "(write one with pipeline.save_pretrained(folder))")
    kind = _read_json(path / "model_index.json", path).get("_class_name")
    if kind not in SD_PIPELINES:
        raise ValueError(f"model folder {str(path)!r} holds a {kind!r}, not a Stable-Diffusion-format pipeline "
                         f"({' or '.join(SD_PIPELINES)}: a UNet2DConditionModel, an AutoencoderKL and a CLIP text "
                         "encoder)")
    missing = [name for name in COMPONENT_CONFIGS if not (path / name).is_file()]
    if missing:
        raise ValueError(f"model folder {str(path)!r} is incomplete: missing {', '.join(missing)}")
    for name, classes in COMPONENT_CONFIGS.items():
        declared = _read_json(path / name, path).get("_class_name")
        if classes is not None and declared is not None and declared not in classes:
            raise ValueError(f"model folder {str(path)!r}: {name} declares a {declared!r}, expected "
                             f"{' or '.join(classes)}")


def scheduler_config(name: str) -> dict | None:
    """Model ``name``'s scheduler config when known without loading the model (the built-in models made from SD's
    schedule, and pipeline folders), else None."""
    if name in ("tiny", "shapes"):
        return dict(SD_SCHEDULER_CONFIG)
    path = Path(name).expanduser() / "scheduler" / "scheduler_config.json"
    if name in CACHED_MODELS:
        path = cached_model_path(name) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def resolve_model(name: str) -> str:
    """Checks a model name and returns it, or the folder it names; raises ValueError naming the fix."""
    if name in BUILTIN_MODELS:
        return name
    path = Path(name).expanduser()
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL character
        is_dir = False
    if is_dir:
        check_pipeline_folder(path)
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
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs),
        "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
        "scheduler": lambda: Schedule.from_scheduler_config(DDIMScheduler.load_config(source, subfolder="scheduler",
                                                                                      **kwargs)),
    }
    parts = {}
    for part, load in loaders.items():
        try:
            parts[part] = load()
        except Exception as error:  # whatever diffusers or transformers raise on a file they cannot use
            raise ValueError(f"model {source!r}: its {part} does not load ({type(error).__name__}: {error})") from error
    check_components(source, parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"])
    return Policy(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"])


def check_components(source: str, unet, vae, text_encoder, tokenizer) -> None:
    """Raises ValueError naming ``source`` unless the components fit together as Stable Diffusion's do."""
    u, errors = unet.config, []
    positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > positions:
        errors.append(f"the tokenizer pads prompts to {tokenizer.model_max_length} tokens but the text encoder has "
                      f"{positions} positions (tokenizer/tokenizer_config.json missing, or without model_max_length?)")
    if u.in_channels != vae.config.latent_channels or u.out_channels != u.in_channels:
        errors.append(f"the UNet maps {u.in_channels} to {u.out_channels} channels but the VAE's latents have "
                      f"{vae.config.latent_channels} (an inpainting or other non-text-to-image UNet?)")
    cross = u.cross_attention_dim if isinstance(u.cross_attention_dim, (list, tuple)) else [u.cross_attention_dim]
    if any(dim != text_encoder.config.hidden_size for dim in cross):
        errors.append(f"the UNet attends to {u.cross_attention_dim}-wide text states but the text encoder's are "
                      f"{text_encoder.config.hidden_size} wide")
    scale = vae.config.scaling_factor
    if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
        errors.append(f"the VAE's scaling_factor must be a finite number > 0, got {scale!r}")
    if u.addition_embed_type not in (None, "text"):
        errors.append(f"the UNet needs extra conditioning (addition_embed_type={u.addition_embed_type!r}, as SDXL's); "
                      "only Stable-Diffusion 1.x/2.x-format UNets are supported")
    if errors:
        raise ValueError(f"model {source!r} is not a consistent Stable-Diffusion pipeline: " + "; ".join(errors))
