"""CLIP score, PickScore and HPSv2: the score formulas by hand, and the rewards on tiny random CLIP models."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from diffalign.models.tokenizer import clip_tokenizer
from diffalign.rewards import RewardError, get
from diffalign.rewards.clipscore import clip_score
from diffalign.rewards.common import (
    MissingDependencyError,
    clip_image_features,
    clip_preprocess,
    clip_text_features,
)
from diffalign.rewards.hpsv2 import HpsV2Reward, hps_preprocess, hps_score
from diffalign.rewards.pickscore import pick_score

IMAGE_FEATURES = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
TEXT_FEATURES = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 0.5]])
COSINES = [1 / math.sqrt(2), -1.0, 1.0]


def test_score_formulas_by_hand():
    assert clip_score(IMAGE_FEATURES, TEXT_FEATURES).tolist() == pytest.approx([100 / math.sqrt(2), 0.0, 100.0])
    assert clip_score(IMAGE_FEATURES, TEXT_FEATURES, weight=2.5).tolist() == pytest.approx([2.5 / math.sqrt(2), 0, 2.5])
    # CLIP's initial logit scale is log(1 / 0.07): PickScore multiplies the cosine by exp of it
    scale = torch.tensor(math.log(1 / 0.07))
    assert pick_score(IMAGE_FEATURES, TEXT_FEATURES, scale).tolist() == pytest.approx([c / 0.07 for c in COSINES])
    assert hps_score(IMAGE_FEATURES, TEXT_FEATURES).tolist() == pytest.approx(COSINES)


def test_offline_tokenizer_has_openai_clip_ids():
    ids = clip_tokenizer()(["a photo of a cat"])["input_ids"][0]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def _reference_features(model, images, prompts):
    """Features by the reference route: transformers' image processor (PIL, uint8) and the tokenizer."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    pixels = CLIPImageProcessor()(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = clip_image_features(model, pixels)
        text = clip_text_features(model, clip_tokenizer(), prompts, torch.device("cpu"))
    return image, text


IMAGES = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
PROMPTS = ["a red circle", "two blue squares above a green triangle"]


def test_pickscore_reward_matches_reference_route(tiny_clip):
    reward = get("pickscore", model=tiny_clip)
    with torch.no_grad():
        got = reward(IMAGES, PROMPTS)
    image, text = _reference_features(tiny_clip, IMAGES, PROMPTS)
    cosine = torch.nn.functional.cosine_similarity(image, text)
    expected = tiny_clip.logit_scale.exp() * cosine
    assert got.tolist() == pytest.approx(expected.tolist(), abs=2e-3)
    # the factor is really applied: exp(logit_scale_init_value = 2.6592) = 14.28, not 1
    assert tiny_clip.logit_scale.exp().item() == pytest.approx(math.exp(2.6592), rel=1e-5)


def test_clipscore_reward_matches_reference_route(tiny_clip):
    reward = get("clipscore", clip_model=tiny_clip)
    with torch.no_grad():
        got = reward(IMAGES, PROMPTS)
    image, text = _reference_features(tiny_clip, IMAGES, PROMPTS)
    expected = 100 * torch.nn.functional.cosine_similarity(image, text).clamp(min=0)
    assert got.tolist() == pytest.approx(expected.tolist(), abs=0.2)  # 100 x the pickscore tolerance
    assert (got >= 0).all()


def test_hpsv2_score_on_a_transformers_clip(tiny_clip):
    """The same factored score with a CLIPModel: cosine of the features, no logit scale, letterboxed input."""
    reward = HpsV2Reward(model=tiny_clip)
    wide = torch.rand(2, 3, 48, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = reward(wide, PROMPTS)
        image = clip_image_features(tiny_clip, hps_preprocess(wide))
        text = clip_text_features(tiny_clip, clip_tokenizer(), PROMPTS, torch.device("cpu"))
    assert got.tolist() == pytest.approx(torch.nn.functional.cosine_similarity(image, text).tolist(), abs=1e-5)
    assert (got.abs() <= 1).all()
    # square images: letterbox and the CLIP resize-and-crop agree, so the score equals the CLIP-score cosine
    with torch.no_grad():
        square = reward(IMAGES, PROMPTS)
        crop_image = clip_image_features(tiny_clip, clip_preprocess(IMAGES))
    expected = torch.nn.functional.cosine_similarity(crop_image, text)
    assert square.tolist() == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize("name,kwargs", [("pickscore", "model"), ("clipscore", "clip_model"), ("hpsv2", "model")])
def test_prompt_rewards_are_differentiable_and_prompt_dependent(tiny_clip, name, kwargs):
    reward = get(name, **{kwargs: tiny_clip})
    assert reward.differentiable and reward.needs_prompts
    images = IMAGES[:1].repeat(2, 1, 1, 1).clone().requires_grad_(True)
    values = reward(images, PROMPTS)
    assert values[0].item() != pytest.approx(values[1].item(), abs=1e-6)  # same image, different prompts
    values.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(RewardError, match=rf"reward '{name}' scores images against their prompts.*\[1\] are empty"):
        reward(IMAGES, ["a cat", "  "])


def test_hpsv2_without_open_clip_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingDependencyError, match=r"reward 'hpsv2' needs the 'open_clip_torch'.*pip install"):
        HpsV2Reward(checkpoint="v2.0")


def test_hpsv2_bad_checkpoint_names_the_files(tmp_path):
    from diffalign.rewards.hpsv2 import _resolve_checkpoint

    with pytest.raises(RewardError, match=r"'/nowhere/hps\.pt' is neither a file.*HPS_v2_compressed\.pt.*xswu/HPSv2"):
        _resolve_checkpoint("/nowhere/hps.pt", "hpsv2")
    with pytest.raises(RewardError, match=r"could not fetch HPS_v2\.1_compressed\.pt.*checkpoint='/path/to"):
        _resolve_checkpoint("v2.1", "hpsv2")  # HF_HUB_OFFLINE=1: fails at once
    real = tmp_path / "HPS_v2_compressed.pt"
    real.write_bytes(b"")
    assert _resolve_checkpoint(real, "hpsv2") == real
