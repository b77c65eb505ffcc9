"""LoRA on the UNet through peft, and its export in diffusers format.

The exported folder loads into a plain ``StableDiffusionPipeline`` with ``pipe.load_lora_weights(folder)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

#: The attention projections DDPO adapts: to_q/k/v/out of self- and cross-attention.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(unet: nn.Module, rank: int, alpha: float, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES) -> None:
    """Freezes ``unet`` and adds a trainable LoRA adapter (B initialised to zero, so the model is unchanged)."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    # peft's rule: a target names a module whose full name is it or ends in "." + it; LoRA wraps Linear and Conv.
    layers = [name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in layers)]
    if not target_modules or unmatched:
        raise ValueError(f"lora target modules {list(target_modules)!r}: {unmatched or 'none'} name no Linear or "
                         f"Conv2d layer of the UNet (e.g. {', '.join(DEFAULT_TARGET_MODULES)})")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    )


def has_lora(unet: nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_lora(unet: nn.Module, directory: str | Path) -> Path:
    """Writes the UNet's LoRA as ``pytorch_lora_weights.safetensors`` in diffusers format (with its rank/alpha)."""
    if not has_lora(unet):
        raise ValueError("save_lora: the UNet has no LoRA adapter (was the run full fine-tuning?)")
    directory = Path(directory)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=state, unet_lora_adapter_metadata=metadata, safe_serialization=True
    )
    return directory
