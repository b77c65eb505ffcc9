import pytest
import torch

from diffalign.prompts.shapes import ShapesPrompts, shapes_prompts
from diffalign.world.captions import caption_split


def test_prompt_source_draws_its_split_reproducibly_at_any_batch_size():
    for split in ("train", "heldout"):
        source = ShapesPrompts(split)
        whole = source.draw(64, torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        pieces = source.draw(16, g) + source.draw(48, g)
        assert whole == pieces
        assert all(caption_split(p) == split for p in whole)
        assert len(set(whole)) > 30
    assert shapes_prompts(8, 2, "heldout") == ShapesPrompts("heldout").draw(8, 2)


def test_registered_in_the_prompt_sources():
    from diffalign import prompts

    assert prompts.get("shapes") == ShapesPrompts("train") and prompts.get("shapes").name == "shapes"
    heldout = prompts.get("shapes_heldout").draw(32, torch.Generator().manual_seed(0))
    assert all(caption_split(p) == "heldout" for p in heldout)


def test_prompt_source_lists_and_validates():
    assert len(ShapesPrompts("train").all()) == 494 and len(ShapesPrompts("heldout").all()) == 214
    with pytest.raises(ValueError, match="split 'val'"):
        ShapesPrompts("val")
    with pytest.raises(ValueError, match="n must be >= 1"):
        ShapesPrompts().draw(0, 1)
