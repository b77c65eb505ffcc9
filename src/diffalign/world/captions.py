"""The ShapesWorld caption grammar: parse, format, sample, split, and build scenes that match a caption.

Four families (``SIZE`` is optional, see :data:`GRAMMAR`)::

    single    a [SIZE] COLOUR SHAPE                                   "a red circle"
    counting  (two|three|four) [SIZE] COLOUR SHAPEs                   "three small blue squares"
    binding   a [SIZE] COLOUR SHAPE and a [SIZE] COLOUR SHAPE         "a red circle and a green square"
    relation  a [SIZE] COLOUR SHAPE RELATION a [SIZE] COLOUR SHAPE    "a yellow triangle left of a blue circle"

A caption describes its scene completely up to positions and unmentioned sizes: :func:`scene_for_caption`
places exactly the mentioned objects and nothing else. The two objects of a binding or relation caption differ
in colour or shape (two alike would be a counting caption).

Splits (deterministic, disjoint, see :func:`caption_split`): a binding or relation caption that mentions a
(colour, shape) pair in :data:`HELD_OUT_PAIRS`, and a counting caption whose (count, colour, shape) is in
:data:`HELD_OUT_COUNTS`, is ``"heldout"``; every other caption (all singles included) is ``"train"``. Sizes
never change the split. Pretraining sees every held-out object alone, never composed, so the held-out split
measures compositional generalisation.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from diffalign.world.scenes import COLOURS, SHAPES, SIZES, Object, RandomSource, Scene, as_random, place_objects

FAMILIES = ("single", "counting", "binding", "relation")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {"two": 2, "three": 3, "four": 4}
SPLITS = ("train", "heldout")
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("blue", "circle")})
HELD_OUT_COUNTS: frozenset[tuple[int, str, str]] = frozenset(
    {(2, "blue", "triangle"), (3, "yellow", "circle"), (3, "green", "triangle"), (4, "red", "square")}
)
SIZE_PROBABILITY = 0.25
SCENE_RELATION_GAP_PX = 6.0  # generated relation scenes: bbox centres this far apart along the relation axis
GRAMMAR = (
    "the ShapesWorld grammar accepts (case and spacing are free): "
    "'a [SIZE] COLOUR SHAPE'; '(two|three|four) [SIZE] COLOUR SHAPEs'; "
    "'a [SIZE] COLOUR SHAPE and a [SIZE] COLOUR SHAPE'; "
    "'a [SIZE] COLOUR SHAPE (left of|right of|above|below) a [SIZE] COLOUR SHAPE' (two different objects), "
    f"with SIZE in {'|'.join(SIZES)}, COLOUR in {'|'.join(COLOURS)}, SHAPE in {'|'.join(SHAPES)}"
)
_PLURALS = {shape + "s": shape for shape in SHAPES}
_RELATION_WORDS = {("left", "of"): "left of", ("right", "of"): "right of", ("above",): "above", ("below",): "below"}
_VOCABULARY = frozenset(
    {"a", "and", "of", "left", "right", "above", "below"} | set(COUNT_WORDS) | set(SIZES) | set(COLOURS)
    | set(SHAPES) | set(_PLURALS)
)


@dataclass(frozen=True)
class NounPhrase:
    """``count`` objects of one ``colour`` and ``shape``; ``size`` is None when the caption does not say."""

    colour: str
    shape: str
    size: str | None = None
    count: int = 1

    @property
    def kind(self) -> tuple[str, str]:
        """(colour, shape)."""
        return (self.colour, self.shape)

    @property
    def text(self) -> str:
        size = f"{self.size} " if self.size else ""
        if self.count == 1:
            return f"a {size}{self.colour} {self.shape}"
        word = next(w for w, n in COUNT_WORDS.items() if n == self.count)
        return f"{word} {size}{self.colour} {self.shape}s"


@dataclass(frozen=True)
class Caption:
    """A parsed caption: its family, one or two noun phrases and, for relations, ``objects[0] relation
    objects[1]``."""

    family: str
    objects: tuple[NounPhrase, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        n_objects = {"single": 1, "counting": 1, "binding": 2, "relation": 2}.get(self.family)
        if n_objects is None:
            raise ValueError(f"caption family {self.family!r} is unknown; allowed: {', '.join(FAMILIES)}")
        if len(self.objects) != n_objects or (self.relation is not None) != (self.family == "relation"):
            raise ValueError(f"a {self.family} caption has {n_objects} noun phrase(s), got {self}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation {self.relation!r} is unknown; allowed: {', '.join(RELATIONS)}")
        counts = [o.count for o in self.objects]
        valid = counts[0] in COUNT_WORDS.values() if self.family == "counting" else set(counts) == {1}
        if not valid:
            raise ValueError(f"counts {counts} do not fit a {self.family} caption (counting: 2-4, others: 1)")
        if n_objects == 2 and self.objects[0].kind == self.objects[1].kind:
            raise ValueError(f"the two objects of a {self.family} caption must differ in colour or shape")

    @property
    def text(self) -> str:
        """The canonical caption text."""
        if self.family == "binding":
            return f"{self.objects[0].text} and {self.objects[1].text}"
        if self.family == "relation":
            return f"{self.objects[0].text} {self.relation} {self.objects[1].text}"
        return self.objects[0].text


class _GrammarError(Exception):
    pass


def _noun_phrase(tokens: list[str], i: int, count: int) -> tuple[NounPhrase, int]:
    """Parses ``[SIZE] COLOUR SHAPE`` (plural when ``count > 1``) at ``tokens[i]``."""
    size = tokens[i] if i < len(tokens) and tokens[i] in SIZES else None
    i += size is not None
    if i >= len(tokens) or tokens[i] not in COLOURS:
        raise _GrammarError(f"expected a colour at word {i + 1}")
    colour = tokens[i]
    shapes = _PLURALS if count > 1 else {s: s for s in SHAPES}
    if i + 1 >= len(tokens) or tokens[i + 1] not in shapes:
        raise _GrammarError(f"expected a {'plural ' if count > 1 else ''}shape at word {i + 2}")
    return NounPhrase(colour, shapes[tokens[i + 1]], size, count), i + 2


def _parse_tokens(tokens: list[str]) -> Caption:
    unknown = [t for t in tokens if t not in _VOCABULARY]
    if unknown:
        raise _GrammarError(f"unknown word(s) {unknown}")
    if not tokens:
        raise _GrammarError("it is empty")
    if tokens[0] in COUNT_WORDS:
        phrase, i = _noun_phrase(tokens, 1, COUNT_WORDS[tokens[0]])
        if i != len(tokens):
            raise _GrammarError(f"unexpected words after a counting phrase: {tokens[i:]}")
        return Caption("counting", (phrase,))
    if tokens[0] != "a":
        raise _GrammarError("it must start with 'a', 'two', 'three' or 'four'")
    first, i = _noun_phrase(tokens, 1, 1)
    if i == len(tokens):
        return Caption("single", (first,))
    if tokens[i] == "and":
        family, relation, i = "binding", None, i + 1
    else:
        words = next((w for w in _RELATION_WORDS if tuple(tokens[i : i + len(w)]) == w), None)
        if words is None:
            raise _GrammarError(f"expected 'and' or a relation ({', '.join(RELATIONS)}) at word {i + 1}")
        family, relation, i = "relation", _RELATION_WORDS[words], i + len(words)
    if i >= len(tokens) or tokens[i] != "a":
        raise _GrammarError(f"expected 'a' at word {i + 1}")
    second, i = _noun_phrase(tokens, i + 1, 1)
    if i != len(tokens):
        raise _GrammarError(f"unexpected words at the end: {tokens[i:]}")
    try:
        return Caption(family, (first, second), relation)
    except ValueError as error:
        raise _GrammarError(str(error)) from None


def parse_caption(text: str) -> Caption:
    """Parses a caption (case and whitespace are normalised); raises ``ValueError`` outside the grammar."""
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a string, got {type(text).__name__}; {GRAMMAR}")
    try:
        return _parse_tokens(text.lower().split())
    except _GrammarError as error:
        raise ValueError(f"caption {text!r} is outside the ShapesWorld grammar ({error}); {GRAMMAR}") from None


def caption_split(caption: str | Caption) -> str:
    """``"heldout"`` or ``"train"`` (see the module docstring)."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    if spec.family in ("binding", "relation") and any(o.kind in HELD_OUT_PAIRS for o in spec.objects):
        return "heldout"
    phrase = spec.objects[0]
    if spec.family == "counting" and (phrase.count, *phrase.kind) in HELD_OUT_COUNTS:
        return "heldout"
    return "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; allowed: {', '.join(SPLITS)}")


def all_captions(split: str) -> Iterator[Caption]:
    """Every caption of ``split`` without size words, in a fixed order."""
    _check_split(split)
    kinds = list(itertools.product(COLOURS, SHAPES))
    candidates = itertools.chain(
        (Caption("single", (NounPhrase(c, s),)) for c, s in kinds),
        (Caption("counting", (NounPhrase(c, s, None, n),)) for n in COUNT_WORDS.values() for c, s in kinds),
        (Caption("binding", (NounPhrase(*a), NounPhrase(*b))) for a, b in itertools.permutations(kinds, 2)),
        (
            Caption("relation", (NounPhrase(*a), NounPhrase(*b)), r)
            for r in RELATIONS
            for a, b in itertools.permutations(kinds, 2)
        ),
    )
    return (c for c in candidates if caption_split(c) == split)


def _random_phrase(rng: random.Random, count: int, size_probability: float) -> NounPhrase:
    size = rng.choice(tuple(SIZES)) if rng.random() < size_probability else None
    return NounPhrase(rng.choice(tuple(COLOURS)), rng.choice(SHAPES), size, count)


def sample_caption_spec(
    generator: RandomSource, split: str = "train", size_probability: float = SIZE_PROBABILITY
) -> Caption:
    """A random caption of ``split``: family uniform (``"heldout"`` has no singles), then words uniform,
    each noun phrase naming its size with probability ``size_probability``; redrawn until in ``split``."""
    _check_split(split)
    rng = as_random(generator)
    families = FAMILIES if split == "train" else FAMILIES[1:]
    family = rng.choice(families)
    while True:
        if family in ("single", "counting"):
            count = 1 if family == "single" else rng.choice(tuple(COUNT_WORDS.values()))
            caption = Caption(family, (_random_phrase(rng, count, size_probability),))
        else:
            first, second = (_random_phrase(rng, 1, size_probability) for _ in range(2))
            if first.kind == second.kind:
                continue
            relation = rng.choice(RELATIONS) if family == "relation" else None
            caption = Caption(family, (first, second), relation)
        if caption_split(caption) == split:
            return caption


def sample_caption(generator: RandomSource, split: str = "train", size_probability: float = SIZE_PROBABILITY) -> str:
    """The text of :func:`sample_caption_spec`."""
    return sample_caption_spec(generator, split, size_probability).text


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    """Whether centre ``a`` is ``relation`` centre ``b`` by at least ``margin`` pixels (y points down)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    offsets = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}
    if relation not in offsets:
        raise ValueError(f"relation {relation!r} is unknown; allowed: {', '.join(RELATIONS)}")
    return offsets[relation] >= margin


def _relation_is_clear(relation: str, a: Object, b: Object) -> bool:
    """Generated scenes: the relation holds by :data:`SCENE_RELATION_GAP_PX` and dominates the other axis."""
    dx, dy = abs(b.centre[0] - a.centre[0]), abs(b.centre[1] - a.centre[1])
    along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    return relation_holds(relation, a.centre, b.centre, SCENE_RELATION_GAP_PX) and along >= across


def scene_for_caption(caption: str | Caption, generator: RandomSource) -> Scene:
    """A random scene holding exactly the caption's objects (unmentioned sizes drawn uniformly) and, for a
    relation, placed so that it holds clearly."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    rng = as_random(generator)
    objects = [
        (phrase.shape, phrase.colour, phrase.size or rng.choice(tuple(SIZES)))
        for phrase in spec.objects
        for _ in range(phrase.count)
    ]
    accept = None
    if spec.relation is not None:
        accept = lambda placed: _relation_is_clear(spec.relation, placed[0], placed[1])  # noqa: E731
    return place_objects(objects, rng, accept)


def sample_example(
    generator: RandomSource, split: str = "train", size_probability: float = SIZE_PROBABILITY
) -> tuple[str, Scene]:
    """A (caption, scene) pair, both from ``generator``: render the scene for a training example."""
    rng = as_random(generator)
    caption = sample_caption_spec(rng, split, size_probability)
    return caption.text, scene_for_caption(caption, rng)
