"""How much of each denoising step's policy gradient is signal: per-step gradient norms and split-half cosines.

On one fixed rollout (the ``ddpo-shapes`` sampler: groups of ``--group`` samples per caption, advantages
normalised within each group), for every denoising step j it computes the on-policy DDPO gradient of the trained
weights (LoRA) restricted to step j, −mean_b A_b ∇ log π(x_{j+1}|x_j), on two independent halves of the batch
(different captions). ``grad_norm[j]`` is the norm of the whole batch's step-j gradient; ``split_half_cosine[j]``
the cosine between the two halves' step-j gradients: near 0 when the step's gradient is noise, larger when both
halves agree. Prints one JSON object.

    python benchmarks/bench_step_gradients.py --model shapes
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import tyro

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Args:
    model: str = "shapes"
    """Model: shapes or another ShapesWorld pipeline folder (e.g. one made by `diffalign pretrain shapes
    --prediction-type epsilon`), judged by the verifiable reward on ShapesWorld captions; or tiny (brightness,
    animals)."""
    captions: int = 8
    """Captions in the rollout (split in two halves of different captions)."""
    group: int = 8
    """Samples per caption (advantages normalised within each group)."""
    steps: int = 20
    """DDIM steps."""
    seed: int = 0
    """Seed of the captions and the sampling noise."""
    threads: int = 2
    """torch threads."""


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def step_gradient(policy, rollout, advantages, rows, j, settings, params) -> torch.Tensor:
    """The flattened gradient of −mean_b A_b log π at step ``j`` over ``rows``."""
    from diffalign.rollout import transition_log_prob, transitions

    for p in params:
        p.grad = None
    batch = transitions(rollout, rows, torch.full_like(rows, j), advantages)
    step = transition_log_prob(policy, batch, settings)
    (-(batch.advantages * step.log_prob).mean()).backward()
    return _flat_grad(params)


def main(args: Args) -> dict:
    from diffalign import prompts, rewards
    from diffalign.algorithms.advantages import PerPromptStatTracker
    from diffalign.config import preset, replace
    from diffalign.models import add_lora, load_policy
    from diffalign.rollout import sample_batched, sample_seed

    torch.set_num_threads(args.threads)
    world = args.model != "tiny"
    base = preset("ddpo-shapes" if world else "ddpo-tiny")
    config = replace(base, **{"model.name": args.model, "sample.num_inference_steps": args.steps})
    settings = config.sample.settings()
    policy = load_policy(args.model)
    add_lora(policy.unet, config.model.lora_rank, config.model.lora_alpha, config.model.lora_target_modules)
    with torch.no_grad():  # a LoRA with B = 0 has no gradient into A; start from a small random adapter instead
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3, generator=torch.Generator().manual_seed(args.seed))
    source = prompts.get("shapes" if world else "simple_animals")
    captions = source.draw(args.captions, torch.Generator().manual_seed(args.seed))
    prompt_list = [c for c in captions for _ in range(args.group)]
    seeds = [sample_seed(args.seed, 0, i) for i in range(len(prompt_list))]
    rollout = sample_batched(policy, prompt_list, seeds, settings, batch_size=32)
    reward = rewards.get("shapes" if world else "brightness")
    scores = reward(rollout.images, rollout.prompts)
    advantages = PerPromptStatTracker(args.group, args.group).update(rollout.prompts, scores)

    params = [p for p in policy.unet.parameters() if p.requires_grad]
    half = (args.captions // 2) * args.group
    first, second = torch.arange(half), torch.arange(half, len(prompt_list))
    everything = torch.arange(len(prompt_list))
    policy.unet.train()
    norms, cosines = [], []
    for j in range(rollout.num_steps):
        whole = step_gradient(policy, rollout, advantages, everything, j, settings, params)
        g1 = step_gradient(policy, rollout, advantages, first, j, settings, params)
        g2 = step_gradient(policy, rollout, advantages, second, j, settings, params)
        norms.append(whole.norm().item())
        cosines.append(torch.nn.functional.cosine_similarity(g1, g2, dim=0).item())
    squared = torch.tensor(norms) ** 2
    return {
        "model": args.model, "captions": args.captions, "group": args.group, "steps": args.steps,
        "prediction_type": policy.schedule.prediction_type,
        "timesteps": rollout.timesteps[0].tolist(),
        "grad_norm": [round(v, 6) for v in norms],
        "split_half_cosine": [round(v, 4) for v in cosines],
        "squared_norm_share": [round(v, 4) for v in (squared / squared.sum()).tolist()],
        "reward_mean": round(scores.mean().item(), 4),
        "zero_advantage_groups": sum(bool((advantages[i : i + args.group] == 0).all())
                                     for i in range(0, len(prompt_list), args.group)) / args.captions,
    }


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args))))
