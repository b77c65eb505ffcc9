"""ShapesWorld scenes: 1–4 coloured shapes on a dark 32×32 canvas, sampled deterministically.

Coordinates are in pixels of the 32×32 image, ``x`` to the right and ``y`` downwards (image convention), so
"above" means a smaller ``y``. An object's ``centre`` is the centre of its bounding box; the side of that box is
its size in pixels (7 for ``small``, 11 for ``large``). Centres sit on pixel centres (``i + 0.5``) so that
squares are pixel-exact and every size is classified reliably by the detector.

Objects never overlap: their bounding boxes are at least :data:`GAP_PX` background pixels apart on some axis,
and at least :data:`BORDER_PX` pixels from the image border. Placement is rejection sampling driven by one
:class:`random.Random`, so a scene is a pure function of its seed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
SIZES: dict[str, int] = {"small": 7, "large": 11}
BACKGROUND: tuple[int, int, int] = (20, 20, 28)
MAX_OBJECTS = 4
GAP_PX = 3
BORDER_PX = 1
_TRIES_PER_OBJECT = 60
_MAX_SCENE_ATTEMPTS = 2000

RandomSource = torch.Generator | random.Random | int


def as_random(generator: RandomSource) -> random.Random:
    """A :class:`random.Random` from a seed, a ``random.Random`` (used as is) or a ``torch.Generator``.

    A ``torch.Generator`` is advanced by exactly one draw (the seed of the returned ``Random``), so a sequence
    of calls with the same generator is reproducible.
    """
    if isinstance(generator, random.Random):
        return generator
    if isinstance(generator, torch.Generator):
        return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
    if isinstance(generator, int) and not isinstance(generator, bool):
        return random.Random(generator)
    raise TypeError(
        f"generator must be a torch.Generator, a random.Random or an int seed, got {type(generator).__name__}"
    )


def _check_choice(field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} {value!r} is not in ShapesWorld; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class Object:
    """One shape: ``shape`` in :data:`SHAPES`, ``colour`` in :data:`COLOURS`, ``size`` in :data:`SIZES`,
    ``centre`` = (x, y) of its bounding box in pixels."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, tuple(COLOURS))
        _check_choice("size", self.size, tuple(SIZES))

    @property
    def size_px(self) -> int:
        """Side of the bounding box in pixels."""
        return SIZES[self.size]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the bounding box in pixels, x1/y1 exclusive."""
        half = self.size_px / 2
        x, y = self.centre
        return (x - half, y - half, x + half, y + half)

    @property
    def kind(self) -> tuple[str, str]:
        """(colour, shape): what captions and the detector talk about."""
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """A list of non-overlapping objects on the background of a ``IMAGE_SIZE``² image."""

    objects: tuple[Object, ...]

    def kinds(self) -> Counter:
        """Multiset of (colour, shape) of the objects."""
        return Counter(o.kind for o in self.objects)


def boxes_apart(a: Object, b: Object, gap: float = GAP_PX) -> bool:
    """True when the bounding boxes of ``a`` and ``b`` are at least ``gap`` pixels apart on x or on y."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _random_centre(rng: random.Random, size_px: int) -> tuple[float, float]:
    """A pixel-centre position keeping the whole box inside the border."""
    lo = BORDER_PX + size_px // 2
    hi = IMAGE_SIZE - BORDER_PX - size_px // 2 - 1
    return (rng.randint(lo, hi) + 0.5, rng.randint(lo, hi) + 0.5)


def place_objects(
    specs: Sequence[tuple[str, str, str]],
    generator: RandomSource,
    accept: Callable[[tuple[Object, ...]], bool] | None = None,
) -> Scene:
    """Places objects given as (shape, colour, size) at random non-overlapping positions.

    ``accept`` may reject a complete placement (e.g. a spatial relation that does not hold); the whole
    placement is then redrawn. Raises ``ValueError`` if no valid placement is found.
    """
    if not 1 <= len(specs) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(specs)}")
    rng = as_random(generator)
    for _ in range(_MAX_SCENE_ATTEMPTS):
        placed: list[Object] = []
        for shape, colour, size in specs:
            for _ in range(_TRIES_PER_OBJECT):
                candidate = Object(shape, colour, size, _random_centre(rng, SIZES[size]))
                if all(boxes_apart(candidate, other) for other in placed):
                    placed.append(candidate)
                    break
            else:
                break
        if len(placed) == len(specs) and (accept is None or accept(tuple(placed))):
            return Scene(tuple(placed))
    raise ValueError(f"could not place objects {list(specs)} without overlap in {_MAX_SCENE_ATTEMPTS} attempts")


def sample_scene(generator: RandomSource, max_objects: int = MAX_OBJECTS) -> Scene:
    """A random scene: 1..``max_objects`` objects with independent uniform shape, colour and size."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    rng = as_random(generator)
    n = rng.randint(1, max_objects)
    specs = [(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(tuple(SIZES))) for _ in range(n)]
    return place_objects(specs, rng)
