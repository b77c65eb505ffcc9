"""Target tracking of reward-directed sampling (RCGD): does the reward of the samples follow the target asked for?

For every guidance strength G and target y* the same prompts and seeds are sampled with
:func:`~diffalign.steering.rcgd.rcgd`; each cell reports the mean (and std) ground-truth reward of the images (the
judge that labelled μ's training data, without label noise), μ's prediction on the final latents, and per-prompt
diversity. G = 0 is plain sampling: its rewards are the same at every target, the baseline the curves leave.
The figure is the paper's: achieved reward against target, one curve per guidance strength, with the diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.evaluate.evaluation import diversity
from diffalign.models.latent_reward import LatentRewardModel
from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings
from diffalign.steering.rcgd import RCGDConfig, rcgd


def target_tracking(policy: Policy, reward_model: LatentRewardModel, judge, prompts: Sequence[str],
                    settings: StepSettings, targets: Sequence[float], guidances: Sequence[float], seed: int = 0,
                    allow_extrapolation: bool = False, previews: int = 8) -> tuple[list[dict], list[torch.Tensor]]:
    """One row per (guidance, target): the judge's and μ's mean and std reward and the diversity (see above);
    and per row its first ``previews`` images ``[previews, 3, H, W]`` (the same prompts and seeds in every row)."""
    rows, images = [], []
    cells = [(g, y) for g in guidances for y in targets]
    for guidance, target in tqdm(cells, desc="target tracking"):
        result = rcgd(policy, prompts, reward_model, settings, RCGDConfig(target, guidance, allow_extrapolation),
                      seed=seed)
        with torch.no_grad():
            truth = judge(result.images, list(prompts)).float().cpu()
        rows.append({"guidance": guidance, "target": target, "reward_mean": truth.mean().item(),
                     "reward_std": truth.std(unbiased=False).item(), "predicted_mean": result.rewards.mean().item(),
                     "predicted_std": result.rewards.std(unbiased=False).item(),
                     "diversity": diversity(result.images, prompts)})
        images.append(result.images[:previews].cpu())
    return rows, images


def plot_target_tracking(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Achieved ground-truth (solid) and predicted (dashed) reward against the target, one colour per guidance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    targets = sorted({row["target"] for row in rows})
    axis.plot(targets, targets, color="0.7", linestyle=":", label="achieved = target")
    for index, guidance in enumerate(sorted({row["guidance"] for row in rows})):
        cells = sorted((row for row in rows if row["guidance"] == guidance), key=lambda row: row["target"])
        x = [row["target"] for row in cells]
        colour = f"C{index}"
        axis.errorbar(x, [row["reward_mean"] for row in cells], yerr=[row["reward_std"] for row in cells],
                      color=colour, marker="o", capsize=2, label=f"G = {guidance:g} (ground truth)")
        axis.plot(x, [row["predicted_mean"] for row in cells], color=colour, linestyle="--", alpha=0.7)
    axis.set_xlabel("target reward y*")
    axis.set_ylabel("reward of the samples (dashed: μ's prediction)")
    axis.set_title(title or "RCGD target tracking")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
