"""ShapesWorld captions as a prompt source, with the grammar's train / held-out splits.

It follows the prompt-source protocol of :mod:`diffalign.prompts` (registered there as ``"shapes"`` and
``"shapes_heldout"``): ``ShapesPrompts("train").draw(n, generator)`` draws ``n`` captions one after another
from the same generator, so prompt *i* of a run does not depend on the batch size it was drawn in;
``sample(generator)`` draws one.
``"heldout"`` draws only compositions never seen in pretraining (see :mod:`diffalign.world.captions`);
``all()`` lists a split's size-free captions for exhaustive evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.world.captions import SIZE_PROBABILITY, SPLITS, all_captions, sample_caption
from diffalign.world.scenes import RandomSource, as_random


@dataclass(frozen=True)
class ShapesPrompts:
    """Prompt source over the ShapesWorld grammar."""

    split: str = "train"
    """``"train"`` (pretraining captions) or ``"heldout"`` (held-out compositions)."""
    size_probability: float = SIZE_PROBABILITY
    """Probability that a noun phrase names its size ("a small red circle")."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r} is unknown; allowed: {', '.join(SPLITS)}")
        if not 0.0 <= self.size_probability <= 1.0:
            raise ValueError(f"size_probability must be in [0, 1], got {self.size_probability}")

    def sample(self, generator: RandomSource) -> str:
        """One caption from ``generator`` (a ``torch.Generator``, ``random.Random`` or int seed)."""
        return sample_caption(generator, self.split, self.size_probability)

    @property
    def name(self) -> str:
        """The registered name of this source."""
        return "shapes" if self.split == "train" else "shapes_heldout"

    def draw(self, n: int, generator: RandomSource) -> list[str]:
        """``n`` captions drawn one after another from ``generator`` (the :mod:`diffalign.prompts` protocol)."""
        if n < 1:
            raise ValueError(f"the number of prompts n must be >= 1, got {n}")
        rng = as_random(generator) if isinstance(generator, int) else generator
        return [self.sample(rng) for _ in range(n)]

    def all(self) -> list[str]:
        """Every caption of the split without size words, in a fixed order."""
        return [caption.text for caption in all_captions(self.split)]


def shapes_prompts(n: int, generator: RandomSource, split: str = "train") -> list[str]:
    """``n`` ShapesWorld captions of ``split`` from ``generator``."""
    return ShapesPrompts(split).draw(n, generator)
