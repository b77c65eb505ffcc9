"""The models a server holds: one base pipeline per model family, aligned variants as LoRA adapters on it.

``diffalign serve --model NAME=SOURCE`` names a variant. SOURCE is either a base model (``tiny``, ``shapes``, a
pipeline folder or a hub id, as :func:`~diffalign.models.load_policy` takes) or a LoRA in diffusers format:

- ``RUN_DIR/checkpoints/N/lora`` (any folder holding ``pytorch_lora_weights.safetensors``), or
- ``RUN_DIR`` itself (its latest checkpoint's LoRA),

whose base model is read from the run's ``config.json`` (``model.name``), or given after an ``@``:
``aligned=path/to/lora@shapes``. Every variant of one base shares that base's single :class:`Policy`; each LoRA
is a named peft adapter on its UNet, loaded once. :meth:`ServedModels.activate` selects a variant's adapter, so
it must only be called from the one thread that runs generation (the serve worker): the adapter state is the
only thing the variants share, and that thread owns it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffalign.models import load_policy
from diffalign.models.loading import resolve_model
from diffalign.models.lora import has_lora
from diffalign.models.policy import Policy
from diffalign.train.checkpoint import latest_checkpoint

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: The base model whose prompts follow the ShapesWorld grammar.
SHAPES_WORLD = "shapes"


@dataclass(frozen=True)
class ModelSpec:
    """One served variant: its ``name``, the ``base`` model it runs on and, for an aligned one, its ``lora`` folder."""

    name: str
    base: str
    lora: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME=SOURCE`` (module docstring) → a spec; :class:`ValueError` naming the problem and the fix."""
        name, sep, source = text.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise ValueError(f"--model {text!r}: expected NAME=SOURCE, e.g. base=shapes or "
                             "aligned=runs/x/checkpoints/3/lora")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"--model {text!r}: the name {name!r} may hold only letters, digits, '-' and '_'")
        path, at, base = source.rpartition("@") if "@" in source else (source, "", "")
        lora = _lora_folder(Path(path).expanduser())
        if lora is None:
            if at:
                raise ValueError(f"--model {text!r}: {path!r} holds no {LORA_WEIGHTS} (NAME=LORA@BASE needs a LoRA)")
            return cls(name, resolve_model(source))
        base = base.strip() or _base_of_run(lora)
        if base is None:
            raise ValueError(f"--model {text!r}: cannot tell the base model of the LoRA {str(lora)!r} (no run "
                             f"config.json above it); name it: {name}={path}@BASE, e.g. @shapes")
        return cls(name, resolve_model(base), str(lora))


def _lora_folder(path: Path) -> Path | None:
    """The LoRA folder ``path`` names: itself, or that of the latest complete (verified) checkpoint of a run folder
    or the checkpoint folder itself; else None."""
    if (path / LORA_WEIGHTS).is_file():
        return path
    if not (path / "checkpoints").is_dir() and not (path / "manifest.json").is_file():
        return None
    lora = latest_checkpoint(path) / "lora"
    return lora if (lora / LORA_WEIGHTS).is_file() else None


def _base_of_run(lora: Path) -> str | None:
    """``model.name`` from the ``config.json`` of the run a ``RUN/checkpoints/N/lora`` folder belongs to."""
    config = lora.resolve().parents[2] / "config.json" if len(lora.resolve().parents) > 2 else None
    if config is None or not config.is_file():
        return None
    return json.loads(config.read_text()).get("model", {}).get("name")


@dataclass(frozen=True)
class Variant:
    """A served model: its spec, the family's shared policy and its adapter name (None for the base itself)."""

    spec: ModelSpec
    policy: Policy
    adapter: str | None

    @property
    def shapes_world(self) -> bool:
        """Whether the variant runs on the ShapesWorld model (its prompts follow the caption grammar)."""
        return self.spec.base == SHAPES_WORLD

    def describe(self) -> dict:
        height, width = self.policy.image_size
        return {"name": self.spec.name, "base": self.spec.base, "lora": self.spec.lora,
                "image_size": [height, width], "shapes_world": self.shapes_world}


class ServedModels:
    """The variants, by name, in the order given; each base model loaded once (see the module docstring)."""

    def __init__(self, specs: list[ModelSpec], device: str = "cpu"):
        if not specs:
            raise ValueError("serve needs at least one --model NAME=SOURCE")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"--model names must be unique, got {names}")
        families: dict[str, Policy] = {}
        self.variants: dict[str, Variant] = {}
        for i, spec in enumerate(specs):
            if spec.base not in families:
                families[spec.base] = load_policy(spec.base).to(device).eval()
            policy = families[spec.base]
            adapter = None
            if spec.lora is not None:
                adapter = f"variant_{i}"  # peft adapter names become module keys: keep them plain
                policy.unet.load_lora_adapter(spec.lora, prefix="unet", weight_name=LORA_WEIGHTS, adapter_name=adapter)
            self.variants[spec.name] = Variant(spec, policy, adapter)

    @property
    def names(self) -> list[str]:
        return list(self.variants)

    def activate(self, name: str) -> Policy:
        """Selects variant ``name``'s adapter on its family's UNet and returns the policy (worker thread only)."""
        variant = self.variants[name]
        unet = variant.policy.unet
        if variant.adapter is None:
            if has_lora(unet):
                unet.disable_adapters()
        else:
            unet.set_adapter(variant.adapter)
            unet.enable_adapters()
        return variant.policy
