"""Step generalisation: the same prompts and seeds sampled at several step counts, each scored by the judges.

A few-step method (SDPO) claims its gain holds at every step count while a method trained at one step count
(DDPO) loses it at others. :func:`step_generalisation` measures that for one policy: for each N in ``steps`` the
fixed evaluation sets are sampled with N DDIM steps (the same x_T per sample at every N; the per-step noise
stream is read for N steps) and scored exactly as training evaluations are (:func:`evaluate_policy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from diffalign.evaluate.evaluation import EvalSet, evaluate_policy
from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings


def parse_steps(text: str) -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]``; raises ValueError naming the input unless every entry is an integer >= 1."""
    try:
        steps = [int(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError:
        raise ValueError(f"steps must be comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be integers >= 1, got {text!r}")
    return sorted(set(steps))


def step_generalisation(policy: Policy, sets: Sequence[EvalSet], settings: StepSettings,
                        judges: Mapping[str, object], steps: Sequence[int], batch_size: int) -> list[dict]:
    """One row per step count: ``{"steps": N, **metrics}`` with :func:`evaluate_policy`'s metric names."""
    diversity_sets = [s.name for s in sets if s.name == "diversity"]
    rows = []
    for n in tqdm(steps, desc="step counts", leave=False):
        evaluation = evaluate_policy(policy, sets, dataclasses.replace(settings, num_inference_steps=n), judges,
                                     batch_size, diversity_sets=diversity_sets)
        rows.append({"steps": n, **evaluation.metrics})
    return rows


def markdown_table(results: Mapping[str, Sequence[dict]], key: str) -> str:
    """``key`` for every model (rows) at every step count (columns), as a markdown table."""
    steps = sorted({row["steps"] for rows in results.values() for row in rows})
    lines = [f"| {key} | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for label, rows in results.items():
        by_steps = {row["steps"]: row.get(key) for row in rows}
        cells = ["—" if by_steps.get(n) is None else f"{by_steps[n]:.3f}" for n in steps]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_step_generalisation(results: Mapping[str, Sequence[dict]], keys: Sequence[str], path: Path) -> Path:
    """One panel per metric in ``keys``: the metric against the step count (log scale), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for label, rows in results.items():
            points = [(row["steps"], row[key]) for row in rows if row.get(key) is not None]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sampling steps")
        axis.set_title(key, fontsize=9)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
