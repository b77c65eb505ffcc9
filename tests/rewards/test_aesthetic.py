"""LAION aesthetic heads against the real weights, and the aesthetic reward on a tiny random CLIP."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from diffalign.rewards import RewardError, get
from diffalign.rewards.aesthetic import (
    MLP_HEAD_FILE,
    AestheticHead,
    AestheticReward,
    LinearAestheticHead,
    load_aesthetic_head,
)
from diffalign.rewards.common import clip_image_features, l2_normalize

# Scores of the real "improved" head on the L2-normalised vit_l_14_embeddings/rating{0..9}.npy (measured here,
# fp32 CPU); the known result is "about 1.66 → about 5.75".
EXPECTED_MLP = [1.6555, 2.3593, 3.0698, 3.6725, 4.2380, 4.7010, 5.0731, 5.3654, 5.5767, 5.7468]
EXPECTED_V1_L14 = [-2.4579, -0.1379, 1.8951, 3.5849, 5.0997, 6.4701, 7.7870, 9.0480, 10.2264, 11.3044]


def _rating_embeddings(laion_dir, clip="vit_l_14"):
    rows = [np.load(laion_dir / f"{clip}_embeddings" / f"rating{i}.npy").reshape(-1) for i in range(10)]
    return l2_normalize(torch.from_numpy(np.stack(rows)).float())


def test_real_mlp_head_scores_ratings_in_order(laion_dir):
    head = AestheticHead.load(laion_dir / MLP_HEAD_FILE)
    assert not head.training and isinstance(head.layers, torch.nn.Sequential)
    assert sum(p.numel() for p in head.parameters()) == 927_969
    with torch.no_grad():
        scores = head(_rating_embeddings(laion_dir))
    assert scores.shape == (10,)
    assert (scores[1:] > scores[:-1]).all(), scores.tolist()
    assert scores[0].item() == pytest.approx(1.66, abs=0.05)
    assert scores[9].item() == pytest.approx(5.75, abs=0.05)
    assert scores.tolist() == pytest.approx(EXPECTED_MLP, abs=1e-3)
    # the zero embedding gives 5.24 (spec/rewards.md): the head is affine, this is its offset
    assert head(torch.zeros(1, 768)).item() == pytest.approx(5.24, abs=0.01)


def test_real_v1_linear_heads(laion_dir):
    head = load_aesthetic_head(laion_dir / "sa_0_4_vit_l_14_linear.pth")
    assert isinstance(head, LinearAestheticHead) and head.embed_dim == 768
    with torch.no_grad():
        scores = head(_rating_embeddings(laion_dir))
    assert scores.tolist() == pytest.approx(EXPECTED_V1_L14, abs=1e-3)
    b32 = LinearAestheticHead.load(laion_dir / "sa_0_4_vit_b_32_linear.pth")
    with torch.no_grad():
        b32_scores = b32(_rating_embeddings(laion_dir, "vit_b_32"))
    assert b32.embed_dim == 512 and (b32_scores[1:] > b32_scores[:-1]).all()
    assert isinstance(load_aesthetic_head(laion_dir / MLP_HEAD_FILE), AestheticHead)


def test_mismatched_head_file_names_file_and_fix(laion_dir, tmp_path):
    # a different file under the known name: sha256 mismatch, with both hashes and the fix
    impostor = tmp_path / MLP_HEAD_FILE
    torch.save(AestheticHead().state_dict(), impostor)
    with pytest.raises(RewardError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*sha256.*21dd590f.*Download"):
        AestheticHead.load(impostor)
    # the torch-hub cache name (percent-encoded) is checked too
    encoded = tmp_path / "sac%2Blogos%2Bava1-l14-linearMSE.pth"
    shutil.copy(impostor, encoded)
    with pytest.raises(RewardError, match="sha256"):
        AestheticHead.load(encoded)
    # a v1 head given as the MLP: strict key loading refuses it, naming the file and the expected keys
    linear = tmp_path / "my_head.pth"
    shutil.copy(laion_dir / "sa_0_4_vit_l_14_linear.pth", linear)
    with pytest.raises(RewardError, match=r"(?s)my_head\.pth.*not a AestheticHead checkpoint.*layers"):
        AestheticHead.load(linear)
    with pytest.raises(RewardError, match="does not exist"):
        AestheticHead.load(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(RewardError, match=r"could not read .*garbage\.pth"):
        AestheticHead.load(garbage)


def test_unknown_name_loads_without_hash_check(tmp_path):
    head = AestheticHead()
    torch.save(head.state_dict(), tmp_path / "retrained.pth")
    loaded = AestheticHead.load(tmp_path / "retrained.pth")
    x = torch.randn(3, 768)
    assert torch.equal(loaded(x), head.eval()(x))


def test_reward_is_clip_features_normalised_then_head(tiny_clip):
    """reward = head(normalise(get_image_features(CLIP transform(image)))): exactly with our transform, and within
    the uint8/PIL rounding of the reference route (transformers' image processor, as DDPO) on uint8-exact images."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from diffalign.rewards.common import clip_preprocess

    torch.manual_seed(1)
    head = LinearAestheticHead(768)
    head.weight.data = 100 * torch.nn.functional.normalize(torch.randn(1, 768), dim=-1)  # spreads the scores
    reward = AestheticReward(head=head, clip_model=tiny_clip)
    images = (torch.rand(4, 3, 48, 64) * 255).round() / 255
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).byte().numpy()) for im in images]
    pixels = CLIPImageProcessor()(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        got = reward(images, ["", "", "", ""])
        exact = head(l2_normalize(clip_image_features(tiny_clip, clip_preprocess(images))))
        reference = head(l2_normalize(clip_image_features(tiny_clip, pixels)))
    assert got.shape == (4,) and got.dtype == torch.float32
    assert got.tolist() == pytest.approx(exact.tolist(), abs=1e-5)
    assert (got - reference).abs().max() < 0.02
    assert got.max() - got.min() > 0.2  # the images really differ by more than the tolerance


def test_reward_is_differentiable(tiny_clip):
    reward = get("aesthetic", head=AestheticHead(), clip_model=tiny_clip)
    assert reward.differentiable
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    reward(images, ["a", "b"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.clip.parameters())


def test_reward_errors_name_the_fix(tiny_clip, make_tiny_clip, tmp_path):
    with pytest.raises(RewardError, match=r"'aesthetic' needs the LAION head file.*head="):
        AestheticReward(clip_model=tiny_clip)
    with pytest.raises(RewardError, match=r"512 dims but the head expects 768"):
        AestheticReward(head=AestheticHead(), clip_model=make_tiny_clip(512))
    with pytest.raises(RewardError, match=r"could not load the CLIP model .*nowhere.*local folder"):
        AestheticReward(head=AestheticHead(), clip_model=str(tmp_path / "nowhere"))
