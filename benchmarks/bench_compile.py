"""Sampling with the denoiser compiled (``torch.compile``, ``diffalign sample --compile``) against eager, in one
process: the compilation time and the speed-up once compiled.

Eager and compiled sampling alternate ``--repeats`` times over the same prompts and seeds (the plain sampler of
``diffalign sample``: no log-probs, no gradients); the first compiled call is timed apart as the compilation.
Prints one JSON object with each side's median seconds per batch, ``speedup`` (eager / compiled), ``compile_s``
(the first compiled call minus a compiled call) and the largest difference between the two sides' images.

    python benchmarks/bench_compile.py --model shapes
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
import tyro

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Args:
    model: str = "shapes"
    """Model: tiny, shapes, a pipeline folder or a hub id."""
    batch: int = 32
    """Images per batch."""
    steps: int = 20
    """DDIM steps."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale."""
    repeats: int = 3
    """Timed batches per side (alternating)."""
    threads: int = 2
    """torch threads."""


def main(args: Args) -> dict:
    from diffalign.models import load_policy
    from diffalign.rollout import StepSettings
    from diffalign.steering import Meter
    from diffalign.steering.base import Particles, propagate

    torch.set_num_threads(args.threads)
    eager = load_policy(args.model)
    compiled = copy.deepcopy(eager)
    compiled.unet.compile()
    settings = StepSettings(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    particles = Particles.of([f"prompt {i}" for i in range(args.batch)], 1, 0)

    def run(policy) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        x0 = propagate(policy, particles, settings, Meter())
        return time.perf_counter() - start, x0

    first_s, compiled_x0 = run(compiled)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    run(eager)  # warm-up
    for _ in range(args.repeats):
        for name, policy in [("eager", eager), ("compiled", compiled)]:
            seconds, x0 = run(policy)
            times[name].append(seconds)
            if name == "eager":
                eager_x0 = x0
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"model": args.model, "batch": args.batch, "steps": args.steps, "eager_s": round(eager_s, 3),
            "compiled_s": round(compiled_s, 3), "speedup": round(eager_s / compiled_s, 3),
            "compile_s": round(first_s - compiled_s, 2), "threads": args.threads,
            "max_abs_latent_difference": (eager_x0 - compiled_x0).abs().max().item()}


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args))))
