"""Fixtures for the reward tests: tiny random CLIP models, the LAION data folder, real images, rendered text."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub miss fails at once instead of retrying

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffalign.models.tiny import build_tiny_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LAION_DIR = Path(os.environ.get("DIFFALIGN_LAION_AESTHETIC_DIR", REPO.parent / "shared" / "data" / "laion-aesthetic"))


@pytest.fixture(scope="session")
def tiny_clip():
    """A tiny random CLIPModel with projection dim 768 (the LAION head's input); treat as read-only."""
    return build_tiny_clip(768)


@pytest.fixture(scope="session")
def laion_dir() -> Path:
    """The LAION aesthetic data folder (real head weights and rating embeddings); skips the test when absent."""
    if not (LAION_DIR / "sac+logos+ava1-l14-linearMSE.pth").is_file():
        pytest.skip(
            f"LAION aesthetic data not found at {LAION_DIR} (set DIFFALIGN_LAION_AESTHETIC_DIR to the folder "
            "holding sac+logos+ava1-l14-linearMSE.pth and vit_l_14_embeddings/)"
        )
    return LAION_DIR


def _font_path() -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


def render_text(text: str, size: tuple[int, int] = (256, 128), font_size: int = 40) -> torch.Tensor:
    """Black text on white rendered with PIL and matplotlib's DejaVu Sans, as ``[3, H, W]`` floats in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    font = ImageFont.truetype(_font_path(), font_size)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size[0] - right - left) / 2, (size[1] - bottom - top) / 2), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="session")
def grace_hopper() -> torch.Tensor:
    """matplotlib's sample photo of Grace Hopper in uniform, ``[3, 512, 600]`` in [0, 1]."""
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        array = np.asarray(image.convert("RGB")).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="session")
def make_tiny_clip():
    """:func:`build_tiny_clip` itself, for tests that need another projection dim or seed."""
    return build_tiny_clip


@pytest.fixture(scope="session")
def text_image():
    """:func:`render_text`: black text on white, ``[3, H, W]`` in [0, 1]."""
    return render_text


class TinyBlip(torch.nn.Module):
    """BLIP's interface at toy size (width 32): a patch-embedding "ViT" giving 49 image tokens at 224 px, and a
    1-layer BERT text encoder with cross-attention, plus a BERT tokenizer over a 12-word vocabulary."""

    def __init__(self, tokenizer):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        self.tokenizer = tokenizer
        self.patch = torch.nn.Conv2d(3, 32, kernel_size=32, stride=32)
        config = BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=37, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
        )
        self.text_encoder = BertModel(config, add_pooling_layer=False)

    def visual_encoder(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.patch(pixels).flatten(2).transpose(1, 2)  # [B, 49, 32] image tokens


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory):
    """A :class:`TinyBlip` in eval mode; treat as read-only."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "cat", "on", "the", "moon"]
    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    return TinyBlip(BertTokenizer(str(vocab))).eval()
