import pytest
import torch

from diffalign import prompts


def test_ddpo_sets_have_their_sizes():
    assert len(prompts.get("simple_animals").prompts) == 45
    animals = prompts.get("imagenet_animals").prompts
    assert len(animals) == 398 and animals[0] == "tench, Tinca tinca" and animals[-1].startswith("puffer")
    assert len(prompts.get("imagenet_all").prompts) == 1000
    assert len(prompts.get("imagenet_dogs").prompts) == 118
    pairs = prompts.get("nouns_activities").prompts
    assert len(pairs) == 135 and "a cat riding a bike" in pairs and "an ant playing chess" in pairs


def test_draw_is_deterministic_in_the_generator():
    source = prompts.get("simple_animals")
    a = source.draw(20, torch.Generator().manual_seed(0))
    assert a == source.draw(20, torch.Generator().manual_seed(0))
    assert a != source.draw(20, torch.Generator().manual_seed(1))
    assert set(a) <= set(source.prompts)


def test_prompt_file_that_exists_works(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a red apple\n\n  a green pear  \n")
    source = prompts.get(str(path))
    assert source.prompts == ("a red apple", "a green pear")


def test_missing_and_empty_files_and_unknown_names_are_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prompts.get(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        prompts.get(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="unknown prompt source"):
        prompts.get("imagenet_cats")
