"""ShapesWorld: the embedded toy text-to-image world — scenes, captions, renderer and detector.

A scene is 1–4 coloured shapes on a dark 32×32 canvas; captions come from a small grammar with train and
held-out splits; the deterministic detector makes the caption verifiable (``diffalign.rewards.shapes``)::

    caption, scene = sample_example(seed, split="train")
    image = render_tensor(scene)            # [3, 32, 32] float in [0, 1]
    detect(image)                           # [Detection(shape='circle', colour='red', ...), ...]
"""

from diffalign.world.captions import (
    COUNT_WORDS,
    FAMILIES,
    GRAMMAR,
    HELD_OUT_COUNTS,
    HELD_OUT_PAIRS,
    RELATIONS,
    SPLITS,
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
from diffalign.world.detector import Detection, detect, detect_batch
from diffalign.world.render import render, render_batch, render_random, render_tensor, to_tensor
from diffalign.world.scenes import (
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    Object,
    RandomSource,
    Scene,
    as_random,
    place_objects,
    sample_scene,
)

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "COUNT_WORDS",
    "FAMILIES",
    "GRAMMAR",
    "HELD_OUT_COUNTS",
    "HELD_OUT_PAIRS",
    "IMAGE_SIZE",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Caption",
    "Detection",
    "NounPhrase",
    "Object",
    "RandomSource",
    "Scene",
    "all_captions",
    "as_random",
    "caption_split",
    "detect",
    "detect_batch",
    "parse_caption",
    "place_objects",
    "relation_holds",
    "render",
    "render_batch",
    "render_random",
    "render_tensor",
    "sample_caption",
    "sample_caption_spec",
    "sample_example",
    "sample_scene",
    "scene_for_caption",
    "to_tensor",
]
