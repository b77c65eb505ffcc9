"""OCR reward for text rendering: ``1 − edit_distance(recognised, target) / max(len(target), 1)``, at least 0.

Provenance: Flow-GRPO's ``flow_grpo/ocr.py`` (``OcrScorer``): the target is the text the prompt puts in double
quotes (``'a sign that says "hello"'`` → ``hello``); the recognised lines are joined; both are lower-cased with
spaces removed; a target found inside the recognised text counts as distance 0; the distance is capped at
``len(target)``; reward ``1 − distance / len(target)``.

Where we differ from Flow-GRPO: (1) OCR engine: PP-OCRv4 through ``rapidocr-onnxruntime`` (the same PaddleOCR
models exported to ONNX, shipped inside the wheel, no download) instead of ``paddleocr``; its recogniser is the
Chinese+English model where Flow-GRPO used the English one, and, as there, the angle classifier is off.
(2) An OCR failure raises :class:`RewardError` instead of silently scoring 0 (DESIGN.md "Contracts").
(3) A prompt with several quoted parts asks for all of them, concatenated in order (Flow-GRPO takes the first);
a prompt without quoted text is an error, not an ``IndexError``. (4) ``max(len(target), 1)`` guards the division.
Not differentiable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from diffalign.images import to_uint8
from diffalign.rewards.base import Reward, RewardError
from diffalign.rewards.common import optional_import
from diffalign.rewards.registry import register

_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def target_text(prompt: str) -> str:
    """The text a prompt asks to render: its double-quoted parts ("…" or “…”), joined with spaces."""
    parts = [straight or curly for straight, curly in _QUOTED.findall(prompt)]
    parts = [part for part in parts if part.strip()]
    if not parts:
        raise ValueError(
            f'prompt {prompt!r} has no quoted text to render; write the target in double quotes, '
            'e.g. \'a sign that says "hello"\''
        )
    return " ".join(parts)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions, substitutions)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _canonical(text: str) -> str:
    return "".join(text.split()).lower()


def ocr_reward(recognised: str, target: str, substring_match: bool = True) -> float:
    """Flow-GRPO's text reward: lower-case, drop whitespace, 0 distance if the target is contained (when
    ``substring_match``), distance capped at ``len(target)``, reward ``1 − distance / max(len(target), 1)``."""
    recognised, target = _canonical(recognised), _canonical(target)
    distance = 0 if substring_match and target in recognised else edit_distance(recognised, target)
    distance = min(distance, len(target))
    return 1.0 - distance / max(len(target), 1)


@register("ocr")
class OcrReward(Reward):
    """How exactly each image renders the quoted text of its prompt, in [0, 1] (1 = exact).

    Args:
        substring_match: count the target as exact when it appears inside longer recognised text (Flow-GRPO).
        num_threads: ONNX Runtime threads per session (``None`` = ONNX Runtime's default, all cores).
        det_limit_side_len: the detector rescales each image so its shorter side is at least this (RapidOCR's
            default 736); smaller is faster (320 reads 40-px text on 256-px images as well, ~4x faster on CPU).
    """

    name = "ocr"
    differentiable = False
    needs_prompts = True

    def __init__(
        self,
        substring_match: bool = True,
        num_threads: int | None = None,
        det_limit_side_len: int = 736,
        device: str | torch.device = "cpu",
    ):
        super().__init__(device)
        rapidocr = optional_import("rapidocr_onnxruntime", "rapidocr-onnxruntime", self.name)
        options: dict = {"det_limit_side_len": det_limit_side_len}
        if num_threads is not None:
            options.update(intra_op_num_threads=num_threads, inter_op_num_threads=1)
        self.engine = rapidocr.RapidOCR(**options)
        self.substring_match = substring_match

    def recognise(self, images: torch.Tensor) -> list[str]:
        """The text recognised in each image ``[B, 3, H, W]`` in [0, 1]: detected lines joined in reading order."""
        texts = []
        for array in to_uint8(images).numpy():
            bgr = np.ascontiguousarray(array[..., ::-1])  # RapidOCR takes arrays as OpenCV BGR
            result, _ = self.engine(bgr, use_cls=False)
            texts.append("".join(line[1] for line in result) if result else "")
        return texts

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        try:
            targets = [target_text(p) for p in prompts]
        except ValueError as error:
            raise RewardError(f"reward {self.name!r}: {error}") from error
        texts = self.recognise(images)
        rewards = [ocr_reward(text, target, self.substring_match) for text, target in zip(texts, targets)]
        return torch.tensor(rewards, dtype=torch.float32, device=self.device)
