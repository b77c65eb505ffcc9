"""Methods compared on ShapesWorld under one wall-clock budget: each preset trains for ``--minutes`` of training
time (sampling, reward and updates; evaluation excluded) and is judged on the same fixed captions and seeds.

Per method: held-out and train strict accuracy (base → final; by the gold reward when the trained-on one is a
learned proxy without a strict flag), the trained-on (proxy) reward's and the gold
reward's evaluation means, per-prompt diversity, KL to the base model (mean of the last 10 % of epochs), weight
drift, the training reward (mean over the first and the last 10 % of epochs), epochs, samples and training time
(sampling, reward and updates; evaluation excluded). Prints one JSON object with a markdown table; the run folders stay in ``--out``.

    python benchmarks/bench_methods_shapes.py --presets ddpo-shapes raft-shapes draft-shapes --minutes 10

A preset name may carry settings after ``@`` (dotted keys, comma-separated), compared as its own row:

    python benchmarks/bench_methods_shapes.py --presets draft-shapes draft-shapes@train.learning_rate=3e-3
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import tyro

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Args:
    presets: tuple[str, ...] = ("ddpo-shapes", "raft-shapes", "draft-shapes")
    """Presets to compare (each runs its own method and settings), optionally ``name@key=value,key=value``."""
    minutes: float = 10.0
    """Training minutes per method (unless --epochs is given)."""
    epochs: int | None = None
    """Train every method for this many epochs instead (the same sample budget when the presets sample alike)."""
    eval_freq: int = 0
    """Evaluate every this many epochs as well (for comparisons at matched reward); 0: before and after only."""
    out: str = "runs/methods"
    """Where the run folders go."""


def _strict(metrics: dict, split: str) -> float | None:
    """Strict accuracy by the trained-on reward, or by the gold reward when only the gold one has a strict flag."""
    return metrics.get(f"{split}_strict_accuracy", metrics.get(f"{split}_gold_strict_accuracy"))


def _point(metrics: dict) -> dict:
    """One evaluation's reward means, strict accuracies and diversity."""
    keys = ("heldout_reward_mean", "train_reward_mean", "heldout_gold_mean", "diversity_diversity")
    return {**{k: metrics.get(k) for k in keys}, "heldout_strict": _strict(metrics, "heldout"),
            "train_strict": _strict(metrics, "train")}


def row(run_dir: Path) -> dict:
    """The table row of a finished run folder."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    base, final = summary["base"], summary["final"]
    k = max(1, len(records) // 10)
    kl = [r["kl/to_base"] for r in records[-k:] if "kl/to_base" in r]
    return {
        "algorithm": summary["algorithm"], "reward": summary["reward"], "gold_reward": config["reward"]["gold"],
        "epochs": summary["epochs"],
        "samples": summary["epochs"] * config["sample"]["batch_size_per_device"]
        * config["sample"]["num_batches_per_epoch"],
        "heldout_strict": [_strict(base, "heldout"), _strict(final, "heldout")],
        "train_strict": [_strict(base, "train"), _strict(final, "train")],
        "proxy": [base.get("heldout_reward_mean"), final.get("heldout_reward_mean")],
        "gold": [base.get("heldout_gold_mean"), final.get("heldout_gold_mean")],
        "diversity": [base.get("diversity_diversity"), final.get("diversity_diversity")],
        "kl": sum(kl) / len(kl) if kl else None,
        "evaluations": [{"epoch": 0, **_point(base)}]
        + [{"epoch": r["epoch"] + 1, **_point({k[5:]: v for k, v in r.items() if k.startswith("eval/")})}
           for r in records if any(k.startswith("eval/") for k in r)]
        + [{"epoch": summary["epochs"], **_point(final)}],
        "drift": records[-1].get("train/weight_drift") if records else None,
        "train_reward": [sum(r["reward/mean"] for r in records[:k]) / k, sum(r["reward/mean"] for r in records[-k:]) / k],
        "wall_s": sum(r["time/epoch_s"] for r in records),
    }


def _num(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _pair(values) -> str:
    return " → ".join(_num(v) for v in values)


def markdown(rows: dict[str, dict]) -> str:
    head = ("| preset | training reward (first → last 10 % of epochs) | held-out strict | train strict | "
            "trained-on reward (held-out) | gold reward (held-out) | diversity | KL | drift | epochs | samples | "
            "training time |\n" + "|---" * 12 + "|\n")
    lines = [f"| {name} | {_pair(r['train_reward'])} | {_pair(r['heldout_strict'])} | {_pair(r['train_strict'])} | "
             f"{_pair(r['proxy'])} | {_pair(r['gold'])} | {_pair(r['diversity'])} | {_num(r['kl'], '.3g')} | "
             f"{_num(r['drift'], '.4f')} | {r['epochs']} | {r['samples']} | {r['wall_s'] / 60:.1f} min |"
             for name, r in rows.items()]
    return head + "\n".join(lines)


def variant(name: str):
    """The config a ``preset@key=value,...`` name stands for (values parsed as JSON where they parse)."""
    from diffalign.config import preset, replace

    base, _, settings = name.partition("@")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{name!r}: expected key=value after '@', got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return replace(preset(base), **overrides)


def main(args: Args) -> dict:
    from diffalign.config import replace
    from diffalign.train.loop import train

    rows = {}
    for name in args.presets:
        run_dir = Path(args.out) / name.replace("@", "_").replace(",", "_").replace("=", "-")
        budget = {"epochs": args.epochs} if args.epochs else {"epochs": 100_000, "time_budget_minutes": args.minutes}
        config = replace(variant(name), run_dir=str(run_dir), log_with="none", **budget,
                         **{"eval.freq": args.eval_freq})
        config = replace(config, save_freq=config.epochs)
        train(config)
        rows[name] = row(run_dir)
        print(json.dumps({name: rows[name]}), flush=True)
    return {"minutes": None if args.epochs else args.minutes, "epochs": args.epochs, "methods": rows,
            "markdown": markdown(rows)}


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args))))
