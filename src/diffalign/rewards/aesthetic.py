"""LAION aesthetic predictor: CLIP ViT-L/14 image embedding → MLP head → score on a ~1–10 scale.

Provenance: the "improved" predictor, ``christophschuhmann/improved-aesthetic-predictor`` (``simple_inference.py``),
identical in ddpo-pytorch ``aesthetic_scorer.py`` (the reward of DDPO, DAV and SDPO), ImageReward's
``AestheticScore.py`` and simple-aesthetics-predictor ``v2.py``; the v1 linear heads are
``LAION-AI/aesthetic-predictor``.
spec/rewards.md gives the architecture and file hashes.

Where we differ from DDPO / SDPO (spec/ddpo_sdpo.md §1.7, §3.8): they quantise images to uint8 and run
``CLIPProcessor`` under ``no_grad``, so their reward is not differentiable. We apply the same transform (resize the
shorter side to 224 bicubic, center crop, CLIP mean/std) in torch on the float image, so the reward is
differentiable (as AlignProp/DRaFT need, cf. ``huggingface/trl#1585``). Scores agree with theirs up to the uint8
rounding and PIL's integer arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffalign.rewards.base import Reward, RewardError
from diffalign.rewards.common import (
    check_sha256,
    clip_image_features,
    clip_preprocess,
    l2_normalize,
    load_clip_model,
    load_state_dict_file,
)
from diffalign.rewards.registry import register

if TYPE_CHECKING:
    from transformers import CLIPModel

MLP_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
KNOWN_SHA256 = {
    MLP_HEAD_FILE: "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
    "sa_0_4_vit_l_14_linear.pth": "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba",
    "sa_0_4_vit_b_32_linear.pth": "c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f",
    "sa_0_4_vit_b_16_linear.pth": "8ad3923d7ecf019df20ecd2ab5542a3075fbba0278d239c0371345f3d7fcbde0",
}
"""sha256 of the released head files, by file name (torch hub caches them percent-encoded: ``+`` → ``%2B``)."""

_WHERE = {
    "mlp": "christophschuhmann/improved-aesthetic-predictor on GitHub (also in kvablack/ddpo-pytorch's assets/)",
    "linear": "LAION-AI/aesthetic-predictor on GitHub",
}


def _known_sha256(path: Path) -> str | None:
    return KNOWN_SHA256.get(path.name.replace("%2B", "+").replace("%2b", "+"))


def _load_head_state(path: str | Path, kind: str) -> tuple[Path, dict[str, torch.Tensor]]:
    path = Path(path).expanduser()
    what = f"LAION aesthetic head ({kind})"
    fix = f"Download the file again from {_WHERE[kind]}."
    state = load_state_dict_file(path, what, fix)
    expected = _known_sha256(path)
    if expected is not None:
        check_sha256(path, expected, what, fix)
    return path, state


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], path: Path, expect: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RewardError(
            f"{str(path)!r} is not a {type(module).__name__} checkpoint: its keys/shapes "
            f"{ {k: tuple(v.shape) for k, v in state.items()} } do not match ({error}). Expected {expect}. "
            "Give the matching head file (MLP: sac+logos+ava1-l14-linearMSE.pth; linear: sa_0_4_vit_*_linear.pth)."
        ) from error


def mlp_head_layers(input_size: int) -> nn.Sequential:
    """The MLP shared by the LAION "improved" aesthetic head and ImageReward's head (no activations):
    Linear →1024, Dropout .2, Linear →128, Dropout .2, Linear →64, Dropout .1, Linear →16, Linear →1."""
    return nn.Sequential(
        nn.Linear(input_size, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class AestheticHead(nn.Module):
    """The "improved" LAION aesthetic MLP: L2-normalised CLIP ViT-L/14 embeddings ``[N, 768]`` → scores ``[N]``.

    ``layers`` is the exact ``nn.Sequential`` of the reference (state-dict keys ``layers.{0,2,4,6,7}.*``): Linear
    768→1024, Dropout .2, Linear 1024→128, Dropout .2, Linear 128→64, Dropout .1, Linear 64→16, Linear 16→1 —
    no activations (the "linearMSE" heads comment their ReLUs out), so in eval mode the head is an affine map.
    """

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = mlp_head_layers(embed_dim)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, 768]`` L2-normalised embeddings → ``[N]`` scores."""
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def load(cls, path: str | Path) -> AestheticHead:
        """The head from a state-dict file, in eval mode, loaded strictly with ``weights_only=True``.

        A file named ``sac+logos+ava1-l14-linearMSE.pth`` must have the released sha256. Sister heads with the same
        layout (``ava+logos-l14-linearMSE.pth``) load too; the ReLU variant has different keys and is refused.
        """
        path, state = _load_head_state(path, "mlp")
        head = cls(embed_dim=state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768)
        _strict_load(head, state, path, "keys layers.{0,2,4,6,7}.{weight,bias} (768→1024→128→64→16→1)")
        return head.eval()


class LinearAestheticHead(nn.Module):
    """LAION aesthetic predictor v1: ``Linear(embed_dim, 1)`` on the normalised CLIP embedding (768 for ViT-L/14,
    512 for ViT-B/32 and B/16); state-dict keys ``weight``, ``bias`` as in ``sa_0_4_vit_*_linear.pth``."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.embed_dim = embed_dim
        self.weight = nn.Parameter(torch.zeros(1, embed_dim))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, embed_dim]`` L2-normalised embeddings → ``[N]`` scores."""
        return (embeddings @ self.weight.T + self.bias).squeeze(-1)

    @classmethod
    def load(cls, path: str | Path) -> LinearAestheticHead:
        """The v1 head from ``sa_0_4_vit_*_linear.pth`` (sha256-checked for the released names), in eval mode."""
        path, state = _load_head_state(path, "linear")
        head = cls(embed_dim=state["weight"].shape[-1] if "weight" in state else 768)
        _strict_load(head, state, path, "keys weight [1, D], bias [1]")
        return head.eval()


def load_aesthetic_head(path: str | Path) -> AestheticHead | LinearAestheticHead:
    """Either head, chosen by the file's keys (``layers.*`` → MLP, ``weight``/``bias`` → v1 linear)."""
    path = Path(path).expanduser()
    state = load_state_dict_file(path, "LAION aesthetic head", "Give sac+logos+ava1-l14-linearMSE.pth or a v1 head.")
    if set(state) == {"weight", "bias"}:
        return LinearAestheticHead.load(path)
    return AestheticHead.load(path)


@register("aesthetic")
class AestheticReward(Reward):
    """LAION aesthetic score of each image (prompt-independent), differentiable.

    Pipeline: CLIP transform in torch (shorter side → 224 bicubic, center crop 224, CLIP mean/std) →
    ``CLIPModel.get_image_features`` → L2-normalise → head. Defaults are DDPO's: OpenAI CLIP ViT-L/14 and the
    "improved" MLP head.

    Args:
        head: path to the head file (``sac+logos+ava1-l14-linearMSE.pth``, or a v1 ``sa_0_4_vit_*_linear.pth``),
            or a built head module. Required: the file is not shipped with diffalign.
        clip_model: hub id, local folder (``CLIPModel.save_pretrained`` layout) or a ``CLIPModel``; loaded here,
            never at import. Its projection dim must equal the head's input (768 for ViT-L/14).
        device: where CLIP and the head run.
    """

    name = "aesthetic"
    differentiable = True
    needs_prompts = False

    def __init__(
        self,
        head: str | Path | nn.Module | None = None,
        clip_model: str | Path | CLIPModel = "openai/clip-vit-large-patch14",
        device: str | torch.device = "cpu",
    ):
        super().__init__(device)
        if head is None:
            raise RewardError(
                f"reward {self.name!r} needs the LAION head file: pass head='/path/to/{MLP_HEAD_FILE}' "
                f"(from {_WHERE['mlp']})"
            )
        self.head = load_aesthetic_head(head) if isinstance(head, (str, Path)) else head
        self.head = self.head.to(self.device).eval().requires_grad_(False)
        self.clip = load_clip_model(clip_model, self.name, self.device)
        projection_dim = self.clip.config.projection_dim
        head_dim = getattr(self.head, "embed_dim", projection_dim)
        if projection_dim != head_dim:
            raise RewardError(
                f"reward {self.name!r}: the CLIP model's embeddings have {projection_dim} dims but the head expects "
                f"{head_dim}; use OpenAI CLIP ViT-L/14 (768) with the MLP head, or the v1 head of your CLIP"
            )
        self.image_size = self.clip.config.vision_config.image_size

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = clip_preprocess(images, self.image_size)
        embeddings = l2_normalize(clip_image_features(self.clip, pixels).float())
        return self.head(embeddings)
