import random
from collections import Counter

import pytest
import torch

from diffalign.world.captions import (
    HELD_OUT_COUNTS,
    HELD_OUT_PAIRS,
    Caption,
    NounPhrase,
    all_captions,
    caption_split,
    parse_caption,
    relation_holds,
    sample_caption,
    sample_caption_spec,
    sample_example,
    scene_for_caption,
)

EXAMPLES = {
    "a red circle": Caption("single", (NounPhrase("red", "circle"),)),
    "a small yellow triangle": Caption("single", (NounPhrase("yellow", "triangle", "small"),)),
    "three blue squares": Caption("counting", (NounPhrase("blue", "square", None, 3),)),
    "four large green circles": Caption("counting", (NounPhrase("green", "circle", "large", 4),)),
    "a red circle and a green square": Caption(
        "binding", (NounPhrase("red", "circle"), NounPhrase("green", "square"))
    ),
    "a yellow triangle left of a blue circle": Caption(
        "relation", (NounPhrase("yellow", "triangle"), NounPhrase("blue", "circle")), "left of"
    ),
    "a small red square right of a large red circle": Caption(
        "relation", (NounPhrase("red", "square", "small"), NounPhrase("red", "circle", "large")), "right of"
    ),
    "a green circle above a green triangle": Caption(
        "relation", (NounPhrase("green", "circle"), NounPhrase("green", "triangle")), "above"
    ),
    "a blue square below a yellow square": Caption(
        "relation", (NounPhrase("blue", "square"), NounPhrase("yellow", "square")), "below"
    ),
}


@pytest.mark.parametrize("text", list(EXAMPLES))
def test_parse_and_format_round_trip_every_family(text):
    assert parse_caption(text) == EXAMPLES[text]
    assert parse_caption(text).text == text
    assert parse_caption("  " + text.upper().replace(" ", "   ") + "\n") == EXAMPLES[text]


def test_every_caption_of_the_grammar_round_trips():
    for split in ("train", "heldout"):
        for caption in all_captions(split):
            assert parse_caption(caption.text) == caption


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a purple circle",
        "a red circles",
        "two red circle",
        "one red circle",
        "five red circles",
        "a red",
        "red circle",
        "a red circle.",
        "a red circle and",
        "a red circle and a red circle",
        "a small red circle left of a large red circle",
        "a red circle left a blue square",
        "a red circle next to a blue square",
        "two red circles and a blue square",
        "a big red circle",
        "a red circle a blue square",
    ],
)
def test_captions_outside_the_grammar_raise_naming_caption_and_grammar(text):
    with pytest.raises(ValueError) as error:
        parse_caption(text)
    assert repr(text) in str(error.value) and "grammar accepts" in str(error.value)


def test_splits_are_disjoint_deterministic_and_cover_the_grammar():
    train = [c.text for c in all_captions("train")]
    heldout = [c.text for c in all_captions("heldout")]
    assert train == [c.text for c in all_captions("train")]
    assert not set(train) & set(heldout)
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    # 12 singles + 3×12 counting + 12·11 binding + 4·12·11 relation; held out: 4 counting, and the binding /
    # relation captions touching one of 2 held-out pairs (132 − 10·9 = 42 ordered pairs, ×5)
    assert len(train) + len(heldout) == 12 + 36 + 132 + 528
    assert len(heldout) == 4 + 42 * 5
    assert {(c.objects[0].count, *c.objects[0].kind) for c in all_captions("heldout") if c.family == "counting"} == (
        HELD_OUT_COUNTS
    )
    for caption in all_captions("heldout"):
        if caption.family in ("binding", "relation"):
            assert {o.kind for o in caption.objects} & HELD_OUT_PAIRS
    assert "a red triangle" in train and "a blue circle" in train  # each held-out object is seen alone


def test_sampled_captions_stay_in_their_split_and_are_reproducible():
    rng = random.Random(0)
    train = Counter(sample_caption_spec(rng, "train").family for _ in range(2000))
    assert set(train) == {"single", "counting", "binding", "relation"} and min(train.values()) > 400
    for split in ("train", "heldout"):
        g = torch.Generator().manual_seed(1)
        texts = [sample_caption(g, split) for _ in range(500)]
        assert all(caption_split(t) == split for t in texts)
        g = torch.Generator().manual_seed(1)
        assert texts == [sample_caption(g, split) for _ in range(500)]
    sized = [sample_caption(seed, "train", size_probability=1.0) for seed in range(50)]
    assert all(all(o.size for o in parse_caption(t).objects) for t in sized)
    assert "small" not in " ".join(sample_caption(s, "train", size_probability=0.0) for s in range(200))
    with pytest.raises(ValueError, match="split 'test'"):
        sample_caption(0, "test")


def test_scene_for_caption_holds_exactly_the_caption():
    rng = random.Random(3)
    for _ in range(300):
        spec = sample_caption_spec(rng, rng.choice(["train", "heldout"]), size_probability=0.5)
        scene = scene_for_caption(spec.text, rng)
        assert scene.kinds() == Counter({p.kind: p.count for p in spec.objects})
        for phrase in spec.objects:
            if phrase.size:
                assert {o.size for o in scene.objects if o.kind == phrase.kind} == {phrase.size}
        if spec.relation:
            a, b = scene.objects
            assert relation_holds(spec.relation, a.centre, b.centre, margin=6.0)
    assert sample_example(11) == sample_example(11)
    assert scene_for_caption("two red circles", 5) == scene_for_caption("two red circles", 5)


def test_relation_geometry_uses_image_coordinates():
    left, right, top = (5.0, 10.0), (20.0, 10.0), (5.0, 2.0)
    assert relation_holds("left of", left, right, 2) and not relation_holds("right of", left, right, 2)
    assert relation_holds("above", top, left, 2) and relation_holds("below", left, top, 2)
    assert not relation_holds("left of", (5.0, 0.0), (6.0, 0.0), 2)
    with pytest.raises(ValueError, match="relation 'near'"):
        relation_holds("near", left, right, 2)
