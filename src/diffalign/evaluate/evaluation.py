"""Evaluation as functions of (policy, prompts, seeds, sampler settings, judges), for training, sampling and
comparisons alike.

- :class:`EvalSet`: a fixed list of prompts with fixed seeds (the same at every evaluation of a run).
- :func:`evaluate_policy`: each judge's mean score and strict accuracy (for judges with a strict flag) on each set.
- :func:`diversity`: the mean pairwise distance of samples of the same prompt.
- :func:`kl_to_base`: the KL of the policy's sampling chain to the base model's, on given trajectories.

A judge is any reward (``diffalign.rewards``): it is called through its ``output`` method, which returns the
scores and, for verifiable rewards, the strict (all constraints met) flag.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from diffalign.models.policy import Policy
from diffalign.rollout import Rollout, StepSettings, denoise_step, sample_batched, transitions
from diffalign.samplers import gaussian_kl


@dataclass(frozen=True)
class EvalSet:
    """A named, fixed evaluation set: ``prompts[i]`` is sampled with seed ``seeds[i]``."""

    name: str
    prompts: list[str]
    seeds: list[int]

    def __post_init__(self):
        if len(self.prompts) != len(self.seeds):
            raise ValueError(f"eval set {self.name!r}: {len(self.prompts)} prompts but {len(self.seeds)} seeds")


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_policy` measured: ``metrics`` (``{set}_{judge}_mean``, ``{set}_strict_accuracy`` for
    the judge named ``reward`` and ``{set}_{judge}_strict_accuracy`` for others, ``{set}_diversity``) and each
    set's rollout (images ``[B, 3, H, W]``)."""

    metrics: dict[str, float]
    rollouts: dict[str, Rollout]


def diversity(images: torch.Tensor, prompts: Sequence[str]) -> float | None:
    """Per-prompt diversity: the mean, over prompts with two or more samples, of the mean pairwise RMS distance
    between their images ``[B, 3, H, W]`` (in [0, 1]); None when no prompt has two samples."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    flat = images.detach().float().flatten(1)
    per_prompt = []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        pairs = list(itertools.combinations(rows, 2))
        a, b = flat[[i for i, _ in pairs]], flat[[j for _, j in pairs]]
        per_prompt.append((a - b).square().mean(dim=1).sqrt().mean().item())
    return sum(per_prompt) / len(per_prompt) if per_prompt else None


@torch.no_grad()
def kl_to_base(policy: Policy, rollout: Rollout, settings: StepSettings,
               steps: torch.Tensor | None = None) -> torch.Tensor:
    """KL of the policy's chain to the base model's along ``rollout``'s trajectories, per trajectory ``[B]``.

    Σ_t KL(π_θ(·|x_t) ‖ π_base(·|x_t)) over the trajectory's steps, each in closed form (the steps share σ_t:
    ‖μ_θ − μ_base‖² / 2σ_t², reduced over pixels as ``settings.reduction``); the base model is the policy with
    its trainable weights switched off (:meth:`Policy.reference`). Needs η > 0. Given ``steps`` (step indices),
    only those are computed and the sum is scaled by T / len(steps): an unbiased estimate when they are drawn
    uniformly.
    """
    if settings.eta <= 0:
        raise ValueError(f"kl_to_base: the steps need η > 0 to have a density, got eta = {settings.eta}")
    rows = torch.arange(len(rollout))
    zeros = torch.zeros(len(rollout))
    total = torch.zeros(len(rollout), device=rollout.latents.device)
    chosen = range(rollout.num_steps) if steps is None else [int(j) for j in steps]
    for j in chosen:
        batch = transitions(rollout, rows, torch.full_like(rows, j), zeros)
        step = denoise_step(policy, batch.x_t, batch.t, batch.conditioning, settings, prev_sample=batch.x_prev,
                            with_log_prob=False)
        with policy.reference():
            base = denoise_step(policy, batch.x_t, batch.t, batch.conditioning, settings, prev_sample=batch.x_prev,
                                with_log_prob=False)
        total += gaussian_kl(step.mean, base.mean, step.std, reduction=settings.reduction)
    return total * (rollout.num_steps / len(chosen))


@torch.no_grad()
def weight_drift(policy: Policy) -> float:
    """‖ΔW‖ / ‖W‖ over the adapted weights: with LoRA, ΔW = (α/r)·B·A of every adapted layer against its base
    weight; with full fine-tuning, the UNet's parameters against the reference copy (:meth:`Policy.keep_reference`).
    Both norms are Frobenius norms summed in quadrature over layers."""
    from peft.tuners.lora import LoraLayer

    unet, delta, base = policy.base_unet, 0.0, 0.0
    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    if layers:
        for layer in layers:
            for adapter in layer.active_adapters:
                delta += layer.get_delta_weight(adapter).float().square().sum().item()
            base += layer.get_base_layer().weight.float().square().sum().item()
    elif policy.reference_unet is not None:
        reference = dict(policy.reference_unet.named_parameters())
        for name, p in unet.named_parameters():
            delta += (p.float() - reference[name].float()).square().sum().item()
            base += reference[name].float().square().sum().item()
    else:
        raise ValueError("weight_drift: the UNet has no LoRA adapter and no reference copy (policy.keep_reference())")
    return (delta / base) ** 0.5 if base > 0 else 0.0


def _strict_key(split: str, judge: str) -> str:
    return f"{split}_strict_accuracy" if judge == "reward" else f"{split}_{judge}_strict_accuracy"


@torch.no_grad()
def evaluate_policy(policy: Policy, sets: Sequence[EvalSet], settings: StepSettings, judges: Mapping[str, object],
                    batch_size: int, diversity_sets: Sequence[str] = ()) -> Evaluation:
    """Samples every set with its fixed seeds and scores it with every judge (see :class:`Evaluation`).

    ``judges`` maps a metric name to a reward, e.g. ``{"reward": trained_on, "gold": judged_by}``; sets named in
    ``diversity_sets`` also get ``{set}_diversity``.
    """
    metrics, rollouts = {}, {}
    for eval_set in sets:
        rollout = sample_batched(policy, eval_set.prompts, eval_set.seeds, settings, batch_size)
        rollouts[eval_set.name] = rollout
        for name, judge in judges.items():
            output = judge.output(rollout.images, rollout.prompts)
            if output.strict is not None:
                metrics[_strict_key(eval_set.name, name)] = output.strict.float().mean().item()
            metrics[f"{eval_set.name}_{name}_mean"] = output.scores.float().mean().item()
        if eval_set.name in diversity_sets:
            value = diversity(rollout.images, rollout.prompts)
            if value is not None:
                metrics[f"{eval_set.name}_diversity"] = value
    return Evaluation(metrics, rollouts)
