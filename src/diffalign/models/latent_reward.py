"""μ(z_t, t): a reward regressor on a model's VAE latents, robust to noise so that it can steer sampling (RCGD).

Architecture: the RCGDM reference's ``ThreeLayerConvNet`` (Yuan et al. 2023; ``Kaffaljidhmah2/RCGDM``
``model.py``) with two changes. Three residual basic blocks (conv3×3 → norm → SiLU → conv3×3 → norm, plus a
shortcut that is a 1×1 convolution when the shape changes), channels 64 → 128 (stride 2) → 256 (stride 2) by
default, global average pooling and a linear head. The changes:

- GroupNorm instead of BatchNorm: one latent's prediction, and therefore its guidance gradient, does not depend on
  the rest of its batch, and training and sampling compute the same function;
- optional timestep conditioning: sinusoidal features of t, mapped per block to a channel shift added after the
  first convolution (DDPM's ResBlock). Without it (the reference) the network sees x_t alone and learns
  E[y | x_t] averaged over the noise levels it was trained on.

A trained model is a folder: ``config.json`` (:class:`LatentRewardConfig`: the architecture, the latent shape and
VAE scaling factor of the model whose latents it reads, the range and source of its labels) and
``model.safetensors``. :meth:`LatentRewardModel.load` refuses a folder that is missing, incomplete, or made for
other latents, naming the folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffalign.models.features import TIME_FEATURES, timestep_features

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass(frozen=True)
class LatentRewardConfig:
    """What a latent reward model is and what it was trained on."""

    latent_shape: tuple[int, int, int]
    """(C, h, w) of the latents it reads."""
    scaling_factor: float
    """The VAE scaling factor of those latents (a model with another VAE scaling is another latent space)."""
    channels: tuple[int, ...] = (64, 128, 256)
    """Channels of the residual blocks; every block after the first halves the resolution."""
    time_conditioning: bool = True
    """Whether μ sees the timestep (False: the reference's time-agnostic regressor)."""
    label_min: float = 0.0
    """Smallest training label (targets below it are extrapolation)."""
    label_max: float = 1.0
    """Largest training label."""
    model: str = ""
    """The model whose VAE encoded the training latents (name, folder or hub id)."""
    labels: str = ""
    """What labelled the training images (a registered reward's name)."""

    def __post_init__(self):
        object.__setattr__(self, "latent_shape", tuple(int(v) for v in self.latent_shape))
        object.__setattr__(self, "channels", tuple(int(v) for v in self.channels))


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the most groups (≤ 8) that divide ``channels``."""
    return nn.GroupNorm(next(g for g in (8, 4, 2, 1) if channels % g == 0), channels)


class _Block(nn.Module):
    """A residual basic block with an optional timestep shift after the first convolution."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, time_conditioning: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1)
        self.norm1 = _norm(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.norm2 = _norm(channels_out)
        self.time = nn.Linear(TIME_FEATURES, channels_out) if time_conditioning else None
        self.shortcut = (nn.Identity() if stride == 1 and channels_in == channels_out else
                         nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride=stride), _norm(channels_out)))

    def forward(self, x: torch.Tensor, time: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(x)
        if self.time is not None:
            h = h + self.time(time)[:, :, None, None]
        h = self.norm2(self.conv2(F.silu(self.norm1(h))))
        return F.silu(h + self.shortcut(x))


class LatentRewardModel(nn.Module):
    """μ(z_t, t) ``[b]`` for latents ``[b, C, h, w]`` at timesteps ``[b]`` (see the module docstring)."""

    def __init__(self, config: LatentRewardConfig):
        super().__init__()
        if not config.channels:
            raise ValueError("latent reward model: channels must name at least one block")
        self.config = config
        widths = (config.latent_shape[0], *config.channels)
        self.blocks = nn.ModuleList(_Block(widths[i], widths[i + 1], 1 if i == 0 else 2, config.time_conditioning)
                                    for i in range(len(config.channels)))
        self.head = nn.Linear(config.channels[-1], 1)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if tuple(z_t.shape[1:]) != self.config.latent_shape:
            raise ValueError(f"latent reward model: built for latents {self.config.latent_shape}, given "
                             f"{tuple(z_t.shape[1:])}")
        time = timestep_features(torch.as_tensor(t, device=z_t.device).expand(z_t.shape[0])) \
            if self.config.time_conditioning else None
        h = z_t.float()
        for block in self.blocks:
            h = block(h, time)
        return self.head(h.mean(dim=(2, 3))).squeeze(1)

    def save(self, folder: str | Path) -> Path:
        """Writes ``config.json`` and ``model.safetensors`` to ``folder``; returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> LatentRewardModel:
        """The model saved in ``folder``, in eval mode with gradients off for its parameters."""
        folder = Path(folder)
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
        if not folder.is_dir() or missing:
            what = "does not exist" if not folder.is_dir() else f"has no {' or '.join(missing)}"
            raise ValueError(f"reward model folder {str(folder)!r} {what} (make one with `diffalign reward-model "
                             "train --out DIR`)")
        try:
            fields = json.loads((folder / CONFIG_FILE).read_text())
            model = cls(LatentRewardConfig(**fields))
            model.load_state_dict(load_file(folder / WEIGHTS_FILE))
        except (TypeError, ValueError, RuntimeError, json.JSONDecodeError) as error:
            raise ValueError(f"reward model folder {str(folder)!r} is not a latent reward model: {error}") from None
        return model.to(device).eval().requires_grad_(False)

    def check_compatible(self, latent_shape: tuple[int, ...], scaling_factor: float, where: str = "") -> None:
        """Raises ValueError unless this model reads latents of ``latent_shape`` scaled by ``scaling_factor``."""
        shape, scaling = tuple(latent_shape), float(scaling_factor)
        if shape != self.config.latent_shape or abs(scaling - self.config.scaling_factor) > 1e-6 * abs(scaling):
            raise ValueError(
                f"reward model{' ' + where if where else ''} was trained on latents {self.config.latent_shape} with "
                f"VAE scaling {self.config.scaling_factor:g} (model {self.config.model!r}), but this model's latents "
                f"are {shape} with scaling {scaling:g}; train a reward model on this model's latents")

    def in_label_range(self, target: float) -> bool:
        return self.config.label_min <= target <= self.config.label_max
