"""The experiments that decide whether (and why) DDPO learns on ShapesWorld: variants of ``ddpo-shapes``, one
variable at a time, each on the same fixed seeds, reported as one table.

Each variant trains the ``ddpo-shapes`` preset with a few fields changed, for ``--epochs`` epochs, evaluated
before and after on the preset's fixed train and held-out captions (the preset draws 16 captions × 8 samples per
optimizer step; until the ε-prediction base it drew 4 × 8, which ``samples_32`` restores). Per variant the table
gives:

- ``reward_first`` / ``reward_last``: mean training reward over the first and last 10 % of epochs, and
  ``reward_slope_per_100``: the least-squares slope of the per-epoch training reward, per 100 epochs;
- ``heldout_base`` → ``heldout_final`` and ``train_base`` → ``train_final``: strict accuracy on fixed captions;
- ``drift``: ``train/weight_drift`` at the end; ``kl``: mean ``kl/to_base`` over the last 10 % of epochs;
- ``zero_groups``: mean ``train/zero_advantage_groups``; ``minutes``: wall time of the run;
- ``vs_placebo``: when the ``placebo`` variant ran too, the mean over the second half of the epochs of this run's
  training reward minus the placebo's at the same epoch (every variant draws the same captions and noise seeds in
  the same epoch, so the difference is paired), its standard error treating epochs as independent, and its
  block-bootstrap standard error (:func:`block_bootstrap_se`), which the table shows.

Prints one JSON object (``{"variants": {...}, "markdown": "..."}``); the run folders stay in ``--out``.

    python benchmarks/bench_ddpo_shapes_trials.py --variants reference placebo --epochs 60
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Each variant's changes to the ``ddpo-shapes`` preset (dotted fields, as ``diffalign.config.replace`` takes).
VARIANTS: dict[str, dict] = {
    "reference": {},
    "placebo": {"method.advantages.placebo": True},
    "groups_alone": {"method.advantages.buffer_size": 8},
    "no_last_two_steps": {"method.min_timestep": 101},
    "epsilon_weighting": {"method.step_weighting": "epsilon"},
    "lr_6e-4": {"train.learning_rate": 6e-4},
    "lr_2e-4": {"train.learning_rate": 2e-4},
    "samples_32": {"sample.batch_size_per_device": 32, "sample.num_batches_per_epoch": 1,
                   "train.batch_size_per_device": 32, "train.gradient_accumulation_steps": 1},
    "samples_64": {"sample.batch_size_per_device": 64, "sample.num_batches_per_epoch": 1,
                   "train.batch_size_per_device": 64, "train.gradient_accumulation_steps": 1},
    "samples_128": {"sample.batch_size_per_device": 64, "sample.num_batches_per_epoch": 2,
                    "train.batch_size_per_device": 64, "train.gradient_accumulation_steps": 2},
    "adam_eps_1e-6": {"train.adam_epsilon": 1e-6},
    "lora_time_and_text": {"model.lora_target_modules": ("to_q", "to_k", "to_v", "to_out.0", "time_emb_proj",
                                                         "linear_1", "linear_2", "add_embedding.proj")},
}


@dataclass
class Args:
    variants: tuple[str, ...] = ("reference", "placebo")
    """Variants to run, in order (see VARIANTS)."""
    epochs: int = 60
    """Epochs per run."""
    eval_samples: int = 192
    """Fixed evaluation captions per split."""
    out: str = "runs/trials"
    """Where the run folders go."""
    extra: dict[str, str] = field(default_factory=dict)
    """Changes applied to every variant, as pairs of dotted field and JSON value after one flag:
    --extra method.min_timestep 101 train.learning_rate 6e-4 (a second --extra replaces the first)."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(run_dir: Path) -> dict:
    """The table row of one finished run folder."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "summary.json").read_text())
    rewards = [r["reward/mean"] for r in records]
    k = max(1, len(records) // 10)
    xs = list(range(len(rewards)))
    x_mean, y_mean = _mean(xs), _mean(rewards)
    slope = (sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, rewards))
             / max(sum((x - x_mean) ** 2 for x in xs), 1e-12))
    return {
        "epochs": len(records),
        "reward_first": round(_mean(rewards[:k]), 4), "reward_last": round(_mean(rewards[-k:]), 4),
        "reward_slope_per_100": round(100 * slope, 4),
        "train_base": summary["base"].get("train_strict_accuracy"),
        "train_final": summary["final"].get("train_strict_accuracy"),
        "heldout_base": summary["base"].get("heldout_strict_accuracy"),
        "heldout_final": summary["final"].get("heldout_strict_accuracy"),
        "drift": records[-1].get("train/weight_drift"),
        "kl": round(_mean([r["kl/to_base"] for r in records[-k:] if "kl/to_base" in r]), 6),
        "zero_groups": round(_mean([r["train/zero_advantage_groups"] for r in records]), 4),
    }


def paired_gain(run_dir: Path, control_dir: Path, resamples: int = 2000) -> tuple[float, float, float]:
    """Mean, standard error and block-bootstrap standard error, over the second half of the epochs, of the
    per-epoch training-reward difference between two runs that drew the same captions and seeds (``run_dir``
    minus ``control_dir``).

    Successive epochs are not independent (the weights change slowly, and both runs share each epoch's
    captions), so the plain standard error understates the uncertainty. The block bootstrap resamples runs of
    ``round(sqrt(n))`` consecutive differences (circular moving blocks, Künsch 1989) with a fixed seed, which
    keeps the short-range correlation inside each block."""
    def rewards(path: Path) -> list[float]:
        return [json.loads(line)["reward/mean"] for line in (path / "metrics.jsonl").read_text().splitlines() if line]

    a, b = rewards(run_dir), rewards(control_dir)
    n = min(len(a), len(b))
    diffs = [x - y for x, y in zip(a[n // 2 : n], b[n // 2 : n])]
    mean = _mean(diffs)
    spread = (sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)) ** 0.5
    return round(mean, 4), round(spread / max(len(diffs), 1) ** 0.5, 4), round(block_bootstrap_se(diffs, resamples), 4)


def block_bootstrap_se(values: list[float], resamples: int = 2000, seed: int = 0) -> float:
    """Circular moving-block bootstrap standard error of the mean of ``values`` (blocks of ``round(sqrt(n))``)."""
    n = len(values)
    if n < 2:
        return float("nan")
    length = max(1, round(n ** 0.5))
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        drawn: list[float] = []
        while len(drawn) < n:
            start = rng.randrange(n)
            drawn.extend(values[(start + i) % n] for i in range(length))
        means.append(_mean(drawn[:n]))
    centre = _mean(means)
    return (sum((m - centre) ** 2 for m in means) / (resamples - 1)) ** 0.5


def markdown(rows: dict[str, dict]) -> str:
    head = ("| variant | reward first → last 10 % | slope /100 ep | vs placebo | train strict | held-out strict | "
            "drift | KL | zero groups | min |\n|---|---|---|---|---|---|---|---|---|---|\n")

    def versus(r: dict) -> str:  # ± the block-bootstrap standard error
        return f"{r['vs_placebo'][0]:+.3f} ± {r['vs_placebo'][2]:.3f}" if "vs_placebo" in r else "—"

    lines = [f"| {name} | {r['reward_first']} → {r['reward_last']} | {r['reward_slope_per_100']:+} | {versus(r)} | "
             f"{r['train_base']:.3f} → {r['train_final']:.3f} | {r['heldout_base']:.3f} → {r['heldout_final']:.3f} | "
             f"{r['drift']:.4f} | {r['kl']:.2e} | {r['zero_groups']} | {r['minutes']} |" for name, r in rows.items()]
    return head + "\n".join(lines)


def main(args: Args) -> dict:
    from diffalign.config import preset, replace
    from diffalign.train.loop import train

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    extra = {key: json.loads(value) for key, value in args.extra.items()}
    rows = {}
    for name in args.variants:
        run_dir = Path(args.out) / name
        config = replace(preset("ddpo-shapes"), epochs=args.epochs, run_dir=str(run_dir), log_with="none",
                         save_freq=args.epochs, **{"eval.samples": args.eval_samples, "eval.freq": 0,
                                                   **VARIANTS[name], **extra})
        start = time.perf_counter()
        train(config)
        rows[name] = {**summarise(run_dir), "minutes": round((time.perf_counter() - start) / 60, 1),
                      "changes": {k: str(v) for k, v in {**VARIANTS[name], **extra}.items()}}
        print(json.dumps({name: rows[name]}), flush=True)
    if "placebo" in rows:
        for name in rows:
            rows[name]["vs_placebo"] = paired_gain(Path(args.out) / name, Path(args.out) / "placebo")
    return {"variants": rows, "markdown": markdown(rows)}


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args))))
