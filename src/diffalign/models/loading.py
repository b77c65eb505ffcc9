"""Model names → Policy: ``tiny``, ``shapes``, a local folder, or a hub id (hub ids need the network or a cache)."""

from __future__ import annotations

import re
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffalign.models.policy import Policy, Schedule
from diffalign.models.shapes import base_model_path
from diffalign.models.tiny import build_tiny_pipeline

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

BUILTIN_MODELS = ("tiny", "shapes")


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
    kwargs = dict(revision=revision) if revision else {}
    return Policy(
        UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs),
        AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs),
        CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs),
        CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
        Schedule.from_scheduler_config(DDIMScheduler.load_config(source, subfolder="scheduler", **kwargs)),
    )
