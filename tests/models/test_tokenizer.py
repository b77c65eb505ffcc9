from transformers import CLIPTokenizer

from diffalign.models.tokenizer import clip_tokenizer, save_clip_tokenizer


def test_ids_match_openai_clip():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    # OpenAI CLIP: "a photo of a cat" → BOS, a, photo, of, a, cat, EOS
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77


def test_saved_tokenizer_loads_with_transformers(tmp_path):
    save_clip_tokenizer(tmp_path)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in tmp_path.iterdir()}
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded("two red circles").input_ids == clip_tokenizer()("two red circles").input_ids
