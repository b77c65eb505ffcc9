"""The typed summary of a training run (``summary.json``): what it was and what it measured before and after."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunSummary:
    """``base`` and ``final`` hold the evaluation metrics (:class:`~diffalign.evaluate.evaluation.Evaluation`)
    of the base model and of the trained one, on the same fixed prompts and seeds; ``base`` is None for a run
    resumed past its first epoch whose checkpoint predates it."""

    preset: str
    algorithm: str
    reward: str
    model: str
    epochs: int
    global_step: int
    final: dict[str, float] = field(default_factory=dict)
    base: dict[str, float] | None = None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["base"] is None:
            del data["base"]
        return data

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        return cls(**json.loads(Path(path).read_text()))
