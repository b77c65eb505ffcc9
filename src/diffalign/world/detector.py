"""A deterministic ShapesWorld object detector (numpy only, no learning), batched over images.

Pipeline, for a batch ``[B, 3, H, W]`` in [0, 1] (GenEval-style: detect, then check the caption):

1. **Colour segmentation.** Each pixel's offset from the background colour is compared with each palette
   colour's offset: the nearest palette colour *by direction* (cosine) names the pixel, and the projection
   onto that offset is its coverage ``alpha`` (anti-aliased and blurred edges are blends with the background,
   which keep the direction and scale the length). Pixels with ``alpha < ALPHA_MIN`` (too dark, i.e. too close
   to the background) are background.
2. **Connected components** of same-colour pixels (8-connectivity) by min-label propagation over the whole
   batch at once, pure numpy.
3. **Features** per component: soft area ``Σ alpha``; soft width/height ``Σ_x max_y alpha`` and
   ``Σ_y max_x alpha`` (blur-invariant for convex shapes); fill ratio ``area / (width · height)`` (square 1,
   circle π/4, triangle 1/2); vertical skew of the centroid within the box (triangle +1/6, others 0); the
   ``alpha``-weighted centroid.
4. **Classification**: shape by thresholds on skew, then fill (:func:`classify_shape`); size by the box side.
   Components with a soft area below ``MIN_AREA`` pixels are noise and dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from diffalign.world.scenes import BACKGROUND, COLOURS, SIZES

ALPHA_MIN = 0.15
MIN_AREA = 8.0
SIZE_THRESHOLD_PX = (SIZES["small"] + SIZES["large"]) / 2
# Shape rule: a centroid below the box centre by >= TRIANGLE_SKEW of the height is a triangle (ideal 1/6,
# >= 0.09 even for a 7 px triangle under a 3×3 box blur; circles and squares stay within ±0.02 under noise);
# otherwise a fill ratio >= SQUARE_FILL is a square (ideal 1, >= 0.95 blurred), else a circle (ideal π/4).
TRIANGLE_SKEW = 0.05
SQUARE_FILL = 0.89

# Coverage is not clipped at 1 (noise on fully covered pixels would bias the soft area down); it is clipped at
# 1 only for the per-column/row maxima that measure width and height.
_ALPHA_MAX = 2.0
_COLOUR_NAMES = tuple(COLOURS)
_BG = np.array(BACKGROUND, dtype=np.float32) / 255
_OFFSETS = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32) / 255 - _BG  # [K, 3]
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass(frozen=True)
class Detection:
    """One detected object; positions in pixels (x right, y down), ``area`` in soft pixels."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    area: float
    fill: float
    skew: float

    @property
    def kind(self) -> tuple[str, str]:
        """(colour, shape)."""
        return (self.colour, self.shape)


def _as_batch(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float ``[B, H, W, 3]`` in [0, 1] from a tensor ``[B, 3, H, W]``/``[3, H, W]`` (float in [0, 1]) or a
    uint8 array ``[B, H, W, 3]``/``[H, W, 3]``."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected a float tensor [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        return images.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[3] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array [B, H, W, 3], got {array.dtype} {array.shape}")
    return array.astype(np.float32) / 255


def segment(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel colour index (-1 = background) ``[B, H, W]`` and coverage ``alpha`` (1 = the palette colour)."""
    offset = batch - _BG
    dots = offset @ _OFFSETS.T  # [B, H, W, K]
    norms = np.linalg.norm(offset, axis=-1, keepdims=True) * np.linalg.norm(_OFFSETS, axis=-1)
    colour = np.argmax(dots / np.maximum(norms, 1e-6), axis=-1)
    proj = np.take_along_axis(dots, colour[..., None], axis=-1)[..., 0]
    alpha = np.clip(proj / (_OFFSETS**2).sum(-1)[colour], 0.0, _ALPHA_MAX)
    colour = np.where(alpha >= ALPHA_MIN, colour, -1)
    return colour, np.where(colour >= 0, alpha, 0.0).astype(np.float32)


def connected_components(colour: np.ndarray) -> np.ndarray:
    """8-connected components of equal, non-negative ``colour`` per image: labels ``[B, H, W]``, -1 for
    background; a label is the flat index (over the batch) of the component's first pixel."""
    b, h, w = colour.shape
    big = np.iinfo(np.int64).max
    padded_colour = np.pad(colour, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    labels = np.where(padded_colour >= 0, np.arange(padded_colour.size).reshape(padded_colour.shape), big)
    core = (slice(None), slice(1, h + 1), slice(1, w + 1))
    shifted = [(slice(None), slice(1 + dy, h + 1 + dy), slice(1 + dx, w + 1 + dx)) for dy, dx in _NEIGHBOURS]
    same = [(padded_colour[s] == colour) & (colour >= 0) for s in shifted]
    while True:
        current = labels[core]
        best = current
        for s, ok in zip(shifted, same):
            best = np.minimum(best, np.where(ok, labels[s], big))
        if np.array_equal(best, current):
            break
        labels[core] = best
    out = labels[core]
    return np.where(out == big, -1, out)


def classify_shape(fill: float, skew: float) -> str:
    """Shape from the fill ratio and vertical skew (see :data:`TRIANGLE_SKEW`, :data:`SQUARE_FILL`)."""
    if skew >= TRIANGLE_SKEW:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def detect_batch(images: torch.Tensor | np.ndarray) -> list[list[Detection]]:
    """Detects the objects of every image of a batch; each list is sorted by (x, y) of the centre."""
    batch = _as_batch(images)
    b, h, w, _ = batch.shape
    colour, alpha = segment(batch)
    labels = connected_components(colour)
    img_idx, ys, xs = np.nonzero(labels >= 0)
    results: list[list[Detection]] = [[] for _ in range(b)]
    if img_idx.size == 0:
        return results
    comp_labels, comp = np.unique(labels[img_idx, ys, xs], return_inverse=True)
    n = comp_labels.size
    a = alpha[img_idx, ys, xs].astype(np.float64)
    area = np.bincount(comp, a, n)
    cx = np.bincount(comp, a * xs, n) / area
    cy = np.bincount(comp, a * ys, n) / area
    col_max = np.zeros((n, w))
    row_max = np.zeros((n, h))
    np.maximum.at(col_max, (comp, xs), np.minimum(a, 1.0))
    np.maximum.at(row_max, (comp, ys), np.minimum(a, 1.0))
    width, height = col_max.sum(1), row_max.sum(1)
    box_cy = (row_max * np.arange(h)).sum(1) / height
    fill = area / (width * height)
    skew = (cy - box_cy) / height
    first = np.zeros(n, dtype=np.int64)
    first[comp] = np.arange(comp.size)  # any pixel of the component
    for k in np.nonzero(area >= MIN_AREA)[0]:
        p = first[k]
        side = max(width[k], height[k])
        results[img_idx[p]].append(
            Detection(
                shape=classify_shape(fill[k], skew[k]),
                colour=_COLOUR_NAMES[colour[img_idx[p], ys[p], xs[p]]],
                size="large" if side >= SIZE_THRESHOLD_PX else "small",
                centre=(float(cx[k]) + 0.5, float(cy[k]) + 0.5),  # pixel centres sit at i + 0.5
                area=float(area[k]),
                fill=float(fill[k]),
                skew=float(skew[k]),
            )
        )
    return [sorted(dets, key=lambda d: d.centre) for dets in results]


def detect(image: torch.Tensor | np.ndarray) -> list[Detection]:
    """Detects the objects of one image (``[3, H, W]`` float tensor or ``[H, W, 3]`` uint8 array)."""
    return detect_batch(image)[0]


def kinds(detections: list[Detection]) -> Counter:
    """Multiset of (colour, shape) of the detections."""
    return Counter(d.kind for d in detections)
