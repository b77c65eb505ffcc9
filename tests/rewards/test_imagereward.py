"""ImageReward: the head's standardisation by hand, strict loading, and the score_gard wiring on a tiny BLIP."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from diffalign.rewards import RewardError, get
from diffalign.rewards.common import MissingDependencyError, clip_preprocess
from diffalign.rewards.imagereward import IMAGEREWARD_MAX_LENGTH, ImageRewardHead, ImageRewardReward

WIDTH = 32  # the tiny BLIP's width (tests/rewards/conftest.py)


def _constant_head(raw: float, input_size: int = 768) -> ImageRewardHead:
    """A head whose MLP outputs ``raw`` for every input (all weights 0, last bias ``raw``)."""
    head = ImageRewardHead(input_size)
    for parameter in head.parameters():
        nn.init.zeros_(parameter)
    head.mlp.layers[7].bias.data.fill_(raw)
    return head.eval()


def test_head_standardisation_by_hand():
    features = torch.randn(3, 768)
    assert _constant_head(1.2).raw(features).tolist() == pytest.approx([1.2] * 3)
    # (1.2 − 0.16717362830052426) / 1.0333394966054072 and (0 − 0.167...) / 1.033...
    assert _constant_head(1.2)(features).tolist() == pytest.approx([0.9995034304721563] * 3, abs=1e-6)
    assert _constant_head(0.0)(features).tolist() == pytest.approx([-0.16177996568378675] * 3, abs=1e-6)
    head = ImageRewardHead()
    assert [type(m).__name__ for m in head.mlp.layers] == ["Linear", "Dropout"] * 3 + ["Linear", "Linear"]
    assert [(m.in_features, m.out_features) for m in head.mlp.layers if isinstance(m, nn.Linear)] == [
        (768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)
    ]


def test_head_loads_strictly_from_an_imagereward_state_dict():
    source = ImageRewardHead()
    state = {f"mlp.{key}": value for key, value in source.mlp.state_dict().items()}
    state["blip.visual_encoder.cls_token"] = torch.zeros(1, 1, 1024)  # the rest of ImageReward.pt is ignored
    loaded = ImageRewardHead.from_imagereward_state(state)
    features = torch.randn(2, 768)
    assert torch.equal(loaded(features), source.eval()(features))
    del state["mlp.layers.7.bias"]
    with pytest.raises(RewardError, match=r"(?s)no ImageReward head.*layers\.7\.bias.*THUDM/ImageReward"):
        ImageRewardHead.from_imagereward_state(state)


def test_reward_is_score_gard_with_max_length_35(tiny_blip):
    torch.manual_seed(1)
    head = ImageRewardHead(WIDTH).eval()
    reward = get("imagereward", blip=tiny_blip, head=head)
    seen = {}
    hook = tiny_blip.text_encoder.register_forward_hook(lambda m, args, kw, out: seen.update(kw, ids=args[0]),
                                                        with_kwargs=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    prompts = ["a red circle", "a cat on the moon"]
    try:
        with torch.no_grad():
            got = reward(images, prompts)
    finally:
        hook.remove()
    assert seen["ids"].shape == (2, IMAGEREWARD_MAX_LENGTH)
    assert seen["ids"][1, :8].tolist() == [2, 5, 8, 9, 10, 11, 3, 0]  # [CLS] a cat on the moon [SEP] [PAD]
    assert seen["attention_mask"][1].sum().item() == 7
    assert seen["encoder_hidden_states"].shape == (2, 49, WIDTH)
    # by hand: BLIP text encoder [CLS] state → MLP → standardise
    with torch.no_grad():
        pixels = clip_preprocess(images, 224)
        out = tiny_blip.text_encoder(
            seen["ids"], attention_mask=seen["attention_mask"],
            encoder_hidden_states=tiny_blip.visual_encoder(pixels),
            encoder_attention_mask=torch.ones(2, 49, dtype=torch.long), return_dict=True,
        )
        expected = (head.mlp(out.last_hidden_state[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    assert got.tolist() == pytest.approx(expected.tolist(), abs=1e-5)


def test_reward_is_differentiable(tiny_blip):
    reward = ImageRewardReward(blip=tiny_blip, head=ImageRewardHead(WIDTH))
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    reward(images, ["a cat", "a red circle"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_loading_without_the_package_says_pip_install(monkeypatch, tiny_blip):
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    message = r"reward 'imagereward' needs the 'image-reward'.*pip install image-reward"
    with pytest.raises(MissingDependencyError, match=message):
        ImageRewardReward("ImageReward-v1.0")
    with pytest.raises(RewardError, match="pass both blip= and head="):
        ImageRewardReward(blip=tiny_blip)
