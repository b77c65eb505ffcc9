"""OCR reward: the Flow-GRPO formula by hand, and the real PP-OCRv4 models (rapidocr-onnxruntime) on rendered text."""

from __future__ import annotations

import pytest
import torch

from diffalign.rewards import RewardError, get
from diffalign.rewards.ocr import edit_distance, ocr_reward, target_text

pytest.importorskip("rapidocr_onnxruntime", reason="rapidocr-onnxruntime is in the dev extra: pip install -e .[dev]")


def test_edit_distance_by_hand():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("same", "same") == 0


def test_reward_formula_by_hand():
    assert ocr_reward("Hello", "hello") == 1.0  # case-insensitive
    assert ocr_reward("he llo", "hello") == 1.0  # spaces ignored
    assert ocr_reward("hallo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_reward("big hello sign", "hello") == 1.0  # contained: distance 0 (Flow-GRPO)
    assert ocr_reward("big hello sign", "hello", substring_match=False) == pytest.approx(0.0)  # 9 edits, capped at 5
    assert ocr_reward("", "hello") == 0.0
    assert ocr_reward("xyz", "hello") == 0.0  # capped at len(target): never negative
    assert ocr_reward("abc", "") == 1.0  # max(len, 1) guards the division


def test_target_text_from_quotes():
    assert target_text('a sign that says "hello"') == "hello"
    assert target_text("a poster reading “Open Late”") == "Open Late"
    assert target_text('"big" and "sale"') == "big sale"
    with pytest.raises(ValueError, match=r"no quoted text.*double quotes"):
        target_text("a sign that says hello")
    with pytest.raises(ValueError, match="no quoted text"):
        target_text('an empty sign ""')


@pytest.fixture(scope="module")
def ocr():
    return get("ocr", num_threads=1, det_limit_side_len=320)


def test_real_ocr_reads_rendered_text(ocr, text_image):
    images = torch.stack([text_image("hello"), text_image("diffusion"), text_image("hello"), torch.ones(3, 128, 256)])
    prompts = ['a sign that says "hello"', 'a sign that says "diffusion"', 'a sign that says "world"',
               'a blank sign that says "hello"']
    assert ocr.recognise(images) == ["hello", "diffusion", "hello", ""]
    values = ocr(images, prompts)
    assert values.shape == (4,) and values.dtype == torch.float32
    # right text → exactly 1; "hello" read for "world": edit distance 4 ("l" matches) → 1 − 4/5; blank → 0
    assert values.tolist() == pytest.approx([1.0, 1.0, 0.2, 0.0])
    assert not ocr.differentiable


def test_prompt_without_quotes_is_a_clear_error(ocr, text_image):
    with pytest.raises(RewardError, match=r"reward 'ocr'.*'a sign that says hello' has no quoted text"):
        ocr(text_image("hello")[None], ["a sign that says hello"])
