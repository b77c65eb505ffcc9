"""The run folder: resolved config, metrics.jsonl, sample grids, reward-curve plot, summary and report.

Layout (DESIGN.md "Runs")::

    runs/<name>/config.json  metrics.jsonl  summary.json  report.html
                samples/epoch_0000.png ...  plots/reward.png  checkpoints/<epoch>/  (TensorBoard events)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffalign.evaluate.plots import image_grid, plot_curves, plot_step_heatmap
from diffalign.evaluate.report import write_report
from diffalign.evaluate.summary import RunSummary

#: Samples drawn in the before/after grids (4 rows of 8).
GRID_SAMPLES = 32


class RunFolder:
    """Writes one run's files; only the main process should hold one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        for sub in ("samples", "plots", "checkpoints"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config) -> None:
        """``config.json``: the resolved config (``config.to_dict()``)."""
        (self.path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drops metric lines of epochs ≥ ``epochs_done`` (a resumed run rewrites them), and a last line cut short
        by a run killed while writing it."""
        if self.metrics_path.exists():
            text = self.metrics_path.read_text()
            lines = text.splitlines()
            if lines and not text.endswith("\n"):
                lines.pop()  # torn: the process died inside the write
            kept = [line for line in lines if line and json.loads(line)["epoch"] < epochs_done]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        """Appends one JSON line of metrics (floats)."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def save_samples(self, epoch: int, images: torch.Tensor, captions: list[str],
                     label: str | None = None) -> Path:
        """``samples/epoch_<epoch>.png``: a grid of the first :data:`GRID_SAMPLES` evaluation samples (all of them
        are scored, not all drawn); also written as ``samples/<label>.png`` (``before``, ``after``) when given."""
        path = self.path / "samples" / f"epoch_{epoch:04d}.png"
        grid = image_grid(images[:GRID_SAMPLES], captions[:GRID_SAMPLES])
        grid.save(path)
        if label is not None:
            grid.save(self.path / "samples" / f"{label}.png")
        return path

    def finish(self, run_summary: RunSummary, title: str) -> None:
        """Writes the reward curve, summary.json and report.html."""
        summary = run_summary.to_dict()
        records = self.metrics()
        plot_curves(records, ["reward/mean", "reward/gold_mean"], self.path / "plots" / "reward.png",
                    title="reward on each epoch's samples")
        plot_curves(records, ["train/weight_drift", "kl/to_base"], self.path / "plots" / "drift_kl.png",
                    title="drift of the trained weights and KL to the base model")
        plot_step_heatmap(records, "grad_norm/step_", self.path / "plots" / "step_grad_norms.png",
                          title="gradient norm of each denoising step, per epoch")
        # Evaluations after 0 (base), the periodic ones and all epochs (final), x = epochs done.
        points = [{"epochs_done": 0, **summary.get("base", {})}]
        points += [{"epochs_done": r["epoch"] + 1, **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
                   for r in records if any(k.startswith("eval/") for k in r)]
        points.append({"epochs_done": summary["epochs"], **summary.get("final", {})})
        keys = sorted({k for p in points for k in p if k.endswith(("strict_accuracy", "_mean"))})
        if "base" in summary and keys:
            plot_curves(points, keys, self.path / "plots" / "eval.png", title="evaluation on fixed prompts and seeds",
                        x_key="epochs_done")
        run_summary.write(self.path / "summary.json")
        write_report(self.path, title, summary, records)
