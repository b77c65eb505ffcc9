"""One DDPO epoch, split into sampling / reward / training time, against the denoiser's compute floor.

The floor is measured in the same process right after the epoch: the same number of denoiser forward passes
(at the sampling batch shape, CFG doubled) and forward+backward passes (at the training batch shape) as the
epoch ran, timed alone. ``ratio_epoch_to_floor = epoch_s / floor_s`` is the loop's overhead factor (target
≤ 1.25). Prints one JSON object.

    python benchmarks/bench_ddpo.py                  # the tiny random model
    python benchmarks/bench_ddpo.py --model shapes   # the embedded ShapesWorld model
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass

import torch
import tyro

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Args:
    model: str = "tiny"
    """Model to benchmark: tiny, shapes, a folder or a hub id."""
    reward: str = "jpeg_compressibility"
    """Reward to score samples with."""
    samples: int = 32
    """Samples per epoch."""
    sample_batch: int = 32
    """Sampling batch size."""
    train_batch: int = 32
    """Training minibatch size."""
    steps: int = 20
    """DDIM steps."""
    threads: int = 2
    """torch threads."""
    repeats: int = 2
    """Epochs timed (the first is a warm-up and is not reported)."""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(args: Args) -> dict:
    from accelerate import Accelerator

    from diffalign import prompts, rewards
    from diffalign.algorithms import build
    from diffalign.algorithms.base import trained_steps
    from diffalign.config import preset, replace
    from diffalign.train.loop import build_policy, collect, compute_targets, train_epoch

    torch.set_num_threads(args.threads)
    prompt_source = "shapes" if args.model == "shapes" else "simple_animals"
    config = replace(preset("ddpo-tiny"), prompts=prompt_source,
                     **{"reward.name": args.reward, "method.advantages.min_count": 16, "model.name": args.model, "sample.num_inference_steps": args.steps,
                        "sample.batch_size_per_device": args.sample_batch,
                        "sample.num_batches_per_epoch": args.samples // args.sample_batch,
                        "train.batch_size_per_device": args.train_batch, "train.gradient_accumulation_steps": 1})
    config.check()
    accelerator = Accelerator()
    policy = build_policy(config, accelerator)
    reward = rewards.get(config.reward.name)
    optimizer = torch.optim.AdamW([p for p in policy.unet.parameters() if p.requires_grad], lr=1e-4)
    policy.unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    algorithm = build(config.method, config.sample.settings())
    source = prompts.get(config.prompts)

    timings = []
    for epoch in range(args.repeats):
        prompt_list = source.draw(args.samples, torch.Generator().manual_seed(epoch))
        seeds = list(range(epoch * args.samples, (epoch + 1) * args.samples))
        start = time.perf_counter()
        rollout, split, _ = collect(config, algorithm, policy, reward, prompt_list, seeds)
        targets, _ = compute_targets(algorithm, rollout, accelerator, torch.Generator().manual_seed(epoch))
        start_train = time.perf_counter()
        train_epoch(config, algorithm, policy, optimizer, rollout, targets, accelerator, epoch)
        end = time.perf_counter()
        timings.append({"epoch_s": end - start, "sample_s": split["time/sample_s"],
                        "reward_wait_s": split["time/reward_wait_s"], "train_s": end - start_train})
    measured = timings[-1]

    floor = _floor(policy, trained_steps(args.steps, config.method.timestep_fraction), args, rollout)
    result = {
        "model": args.model, "samples": args.samples, "steps": args.steps, "cfg": True, "lora_rank": 4,
        "threads": args.threads,
        "unet_params_m": sum(p.numel() for p in policy.base_unet.parameters()) / 1e6,
        **{k: round(v, 4) for k, v in measured.items()},
        **{k: round(v, 4) for k, v in floor.items()},
        "ratio_epoch_to_floor": round(measured["epoch_s"] / floor["floor_s"], 4),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def _floor(policy, trained_per_sample: int, args: Args, rollout) -> dict:
    """Times the epoch's denoiser passes alone: forwards at the sampling shape, fwd+bwd at the training shape."""
    unet = policy.unet
    shape = policy.latent_shape
    emb = rollout.prompt_embeds[:1]
    sample_batches = args.samples // args.sample_batch
    sample_forwards = sample_batches * args.steps
    train_passes = (args.samples // args.train_batch) * trained_per_sample
    x = torch.randn(2 * args.sample_batch, *shape)
    t = torch.full((2 * args.sample_batch,), 500)
    e = emb.expand(2 * args.sample_batch, -1, -1)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(sample_forwards):
            unet(x, t, encoder_hidden_states=e)
    forward_s = time.perf_counter() - start
    x = torch.randn(2 * args.train_batch, *shape)
    t = torch.full((2 * args.train_batch,), 500)
    e = emb.expand(2 * args.train_batch, -1, -1)
    start = time.perf_counter()
    for _ in range(train_passes):
        unet(x, t, encoder_hidden_states=e).sample.square().mean().backward()
    backward_s = time.perf_counter() - start
    unet.zero_grad()
    return {"floor_forward_s": forward_s, "floor_forward_backward_s": backward_s,
            "floor_s": forward_s + backward_s}


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args))))
