"""Pictures a person would rather look at: image grids with captions and metric curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from diffalign.images import to_uint8


def image_grid(images: torch.Tensor, captions: Sequence[str] | None = None, columns: int | None = None,
               cell: int = 128) -> Image.Image:
    """Tiles images ``[B, 3, H, W]`` in [0, 1] into one PIL image, each upscaled to ``cell`` px (nearest) with
    its caption underneath."""
    count = images.shape[0]
    columns = columns or min(count, 8)
    rows = math.ceil(count / columns)
    caption_height = 28 if captions else 0
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, array in enumerate(to_uint8(images).numpy()):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption_height)
        grid.paste(Image.fromarray(array).resize((cell, cell), Image.NEAREST), (x, y))
        if captions:
            text = captions[i]
            lines = [text[:22], text[22:44]] if len(text) > 22 else [text]
            for k, line in enumerate(lines):
                draw.text((x + 2, y + cell + 2 + 12 * k), line, fill="black")
    return grid


def plot_curves(records: Sequence[dict], keys: Sequence[str], path: Path, title: str = "",
                x_key: str = "epoch") -> Path:
    """Line plot of ``keys`` over ``x_key`` from metric records (with ±std bands where ``key_std`` exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in keys:
        points = [(r[x_key], r[key], r.get(key.replace("/mean", "/std"))) for r in records if key in r]
        if not points:
            continue
        xs, ys, stds = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, label=key)
        if all(s is not None for s in stds) and key.endswith("/mean"):
            lo = [y - s for y, s in zip(ys, stds)]
            hi = [y + s for y, s in zip(ys, stds)]
            ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set_xlabel(x_key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_step_heatmap(records: Sequence[dict], prefix: str, path: Path, title: str = "") -> Path | None:
    """Heat map of the per-step metrics ``<prefix><j>`` (epochs down, denoising steps across, colour log10 of the
    value), e.g. ``grad_norm/step_``; None (nothing written) when no record has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k in r if k.startswith(prefix)}, key=lambda k: int(k[len(prefix):]))
    rows = [r for r in records if any(k in r for k in keys)]
    if not rows:
        return None
    values = torch.tensor([[float(r.get(k, float("nan"))) for k in keys] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    image = ax.imshow(values.clamp(min=1e-12).log10().numpy(), aspect="auto", interpolation="nearest",
                      extent=(-0.5, len(keys) - 0.5, rows[-1]["epoch"] + 0.5, rows[0]["epoch"] - 0.5))
    fig.colorbar(image, ax=ax, label=f"log10 {prefix.rstrip('_/')}")
    ax.set_xlabel("denoising step j (0 = first, pure noise)")
    ax.set_ylabel("epoch")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
