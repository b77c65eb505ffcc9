"""Test-time steering on ShapesWorld at matched compute: held-out strict accuracy and reward against the denoiser
passes and reward calls each method spends per image.

Every method samples the same held-out captions (the ``ddpo-shapes`` evaluation's) with the preset's sampler;
particle j of caption i uses the same seed in every method, so best-of-N, FK and SVDD at width k start from the
same noise. best-of-n, fk and svdd steer with ``--reward`` (default: the verifiable ``shapes`` reward);
guidance follows the gradient of ``--gradient-reward`` (default: the learned, differentiable ``shapes_learned``).
Everything is judged by the verifiable reward (its strict flag: every constraint of the caption met). The base
row is plain sampling (best-of-1); ``--lora`` adds a row for a trained LoRA sampled plainly (e.g. a DAV run's
``checkpoints/<epoch>/lora``).

    python benchmarks/bench_steering_shapes.py --particles 2 4 8
    python benchmarks/bench_steering_shapes.py --methods fk --particles 4 --captions 48
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import tyro

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Args:
    methods: tuple[str, ...] = ("best-of-n", "fk", "svdd", "guidance")
    """Steering methods compared."""
    particles: tuple[int, ...] = (2, 4, 8)
    """Widths compared (samples, particles or candidates per step)."""
    captions: int = 192
    """Held-out captions (the first of the ddpo-shapes evaluation's)."""
    reward: str = "shapes"
    """Reward best-of-n, fk and svdd steer with."""
    gradient_reward: str = "shapes_learned"
    """Differentiable reward guidance follows."""
    gradient_scale: float = 1.0
    """guidance: step size on the reward gradient."""
    lora: tuple[str, ...] = ()
    """LoRA folders of trained models, each sampled plainly as one more row."""
    chunk: int = 16
    """Captions steered at once."""
    seed: int = 0


def _config(name: str, k: int, args: Args):
    from diffalign.steering import steerer

    config = steerer(name).config_class(particles=k)
    return dataclasses.replace(config, scale=args.gradient_scale) if name == "guidance" else config


def _run(policy, name: str, config, reward, judge, prompts: list[str], settings, args: Args) -> dict:
    """Steers every caption in chunks; the judge's strict accuracy and mean, the steering reward, compute per image."""
    import torch

    from diffalign.steering import steerer

    start = time.perf_counter()
    strict, gold, steered, passes, grads, calls = [], [], [], 0, 0, 0
    for first in range(0, len(prompts), args.chunk):
        chunk = prompts[first : first + args.chunk]
        result = steerer(name).run(policy, chunk, reward, settings, config, seed=args.seed + first)
        with torch.no_grad():
            output = judge.output(result.images, chunk)
        strict.append(output.strict.float())
        gold.append(output.scores.float())
        steered.append(result.rewards.detach().float().cpu())
        passes, grads, calls = (passes + result.denoiser_passes, grads + result.gradient_passes,
                                calls + result.reward_calls)
    n = len(prompts)
    return {"heldout_strict": torch.cat(strict).mean().item(), "gold_mean": torch.cat(gold).mean().item(),
            "steering_reward_mean": torch.cat(steered).mean().item(), "denoiser_passes_per_image": passes / n,
            "gradient_passes_per_image": grads / n, "reward_calls_per_image": calls / n,
            "seconds": time.perf_counter() - start}


def markdown(rows: list[dict]) -> str:
    head = ("| method | k | held-out strict | gold reward | steering reward | denoiser passes / image | "
            "gradient passes / image | reward calls / image |\n|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {r['method']} | {r['k']} | {r['heldout_strict']:.3f} | {r['gold_mean']:.3f} | "
        f"{r['steering_reward_mean']:.3f} | {r['denoiser_passes_per_image']:.0f} | "
        f"{r['gradient_passes_per_image']:.0f} | {r['reward_calls_per_image']:.0f} |" for r in rows)


def main(args: Args) -> dict:
    from diffalign import prompts as prompt_sources
    from diffalign import rewards
    from diffalign.config import preset
    from diffalign.models import load_policy
    from diffalign.train.loop import evaluation_sets
    from diffalign.steering import BestOfNConfig

    config = preset("ddpo-shapes")
    settings = config.sample.settings()
    heldout = next(s for s in evaluation_sets(config, prompt_sources.get(config.prompts)) if s.name == "heldout")
    prompts = heldout.prompts[: args.captions]
    policy = load_policy(config.model.name)
    judge = rewards.get("shapes", device=policy.device)
    steering = {"plain": rewards.get(args.reward, device=policy.device)}
    steering["gradient"] = rewards.get(args.gradient_reward, device=policy.device)

    rows = []

    def record(method: str, k: int, row: dict) -> None:
        rows.append({"method": method, "k": k, **row})
        print(json.dumps(rows[-1]), flush=True)

    record("base", 1, _run(policy, "best-of-n", BestOfNConfig(1), steering["plain"], judge, prompts, settings, args))
    for folder in args.lora:
        trained = load_policy(config.model.name)
        trained.unet.load_lora_adapter(folder, prefix="unet", weight_name="pytorch_lora_weights.safetensors")
        record(f"lora:{folder}", 1, _run(trained, "best-of-n", BestOfNConfig(1), steering["plain"], judge, prompts,
                                         settings, args))
    for name in args.methods:
        reward = steering["gradient" if name == "guidance" else "plain"]
        for k in args.particles:
            record(name, k, _run(policy, name, _config(name, k, args), reward, judge, prompts, settings, args))
    return {"captions": len(prompts), "settings": dataclasses.asdict(settings), "reward": args.reward,
            "gradient_reward": args.gradient_reward, "gradient_scale": args.gradient_scale, "rows": rows,
            "markdown": markdown(rows)}


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args))))
