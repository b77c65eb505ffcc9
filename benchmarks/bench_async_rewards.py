"""Sampling with rewards scored in a worker thread versus inline, side by side in one process.

The reward is a remote-style scorer with a fixed latency per call (``--latency-s``, like a VLM server); with
the worker thread its calls overlap the next batch's sampling. ``--preset ddpo-shapes --latency-s 0`` instead
times the ShapesWorld epoch with its own in-process verifier, where scoring competes with sampling for the same
cores. Prints one JSON object with both collection times and their ratio.

    python benchmarks/bench_async_rewards.py
    python benchmarks/bench_async_rewards.py --preset ddpo-shapes --latency-s 0 --batches 4 --batch-size 8
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
import tyro

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Args:
    preset: str = "ddpo-tiny"
    """Preset whose model, prompts and reward are sampled (ddpo-tiny scores JPEG compressibility)."""
    latency_s: float = 0.5
    """Seconds each reward call waits on top of scoring (a remote scorer's round trip)."""
    batches: int = 4
    """Sampling batches per epoch."""
    batch_size: int = 8
    """Samples per batch."""
    steps: int = 20
    """DDIM steps."""
    threads: int = 2
    """torch threads."""


def main(args: Args) -> dict:
    from accelerate import Accelerator

    from diffalign.algorithms import build
    from diffalign.config import preset, replace
    from diffalign import prompts as prompt_sources
    from diffalign.train.loop import build_policy, collect, reward_worker

    torch.set_num_threads(args.threads)
    config = replace(preset(args.preset), **{"sample.num_inference_steps": args.steps,
                                             "sample.batch_size_per_device": args.batch_size,
                                             "sample.num_batches_per_epoch": args.batches})
    policy = build_policy(config, Accelerator())
    algorithm = build(config.method, config.sample.settings())
    scorer, _ = config.reward.build("cpu")
    original_score = scorer.score

    def score_after_latency(images, prompts):
        time.sleep(args.latency_s)
        return original_score(images, prompts)

    scorer.score = score_after_latency
    reward = scorer
    prompts = prompt_sources.get(config.prompts).draw(args.batches * args.batch_size,
                                                      torch.Generator().manual_seed(0))
    seeds = list(range(len(prompts)))
    collect(config, algorithm, policy, reward, prompts[: args.batch_size], seeds[: args.batch_size])  # warm-up
    results = {}
    with reward_worker() as executor:  # the loop's worker (one intra-op thread)
        for name, pool in [("inline", None), ("async", executor), ("inline_again", None)]:
            start = time.perf_counter()
            rollout, _, _ = collect(config, algorithm, policy, reward, prompts, seeds, pool)
            results[name] = time.perf_counter() - start
            results.setdefault("rewards", rollout.rewards.tolist())
    inline = (results["inline"] + results["inline_again"]) / 2
    return {"preset": args.preset, "latency_s": args.latency_s, "batches": args.batches, "inline_s": round(inline, 3),
            "async_s": round(results["async"], 3), "ratio_async_to_inline": round(results["async"] / inline, 3),
            "reward_time_total_s": args.latency_s * args.batches}


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args))))
