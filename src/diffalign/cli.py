"""``diffalign train | sample | config show | config validate | reward-server``: typed configs through tyro.

``--preset NAME`` picks the starting config; every other flag overrides one field (``--help`` lists them).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from diffalign.config import PRESETS, Config, preset

USAGE = f"""usage: diffalign COMMAND [--preset NAME] [FLAGS]

commands:
  train            run a training preset (flags override fields; see `diffalign train --help`)
  sample           generate an image grid from a model (optionally with a trained LoRA)
  config show      print the resolved config as JSON
  config validate  check a config and list every problem
  reward-server    serve a registered reward over HTTP
  pretrain shapes         train the ShapesWorld base model (see `diffalign pretrain shapes --help`)
  pretrain shapes-reward  train the learned, differentiable ShapesWorld reward

presets: {', '.join(sorted(PRESETS))}
"""

DEFAULT_PRESET = "ddpo-tiny"


def _split_preset(args: list[str]) -> tuple[str, list[str]]:
    """Removes ``--preset NAME`` / ``--preset=NAME`` from ``args``."""
    name, rest, i = DEFAULT_PRESET, [], 0
    while i < len(args):
        if args[i] == "--preset" and i + 1 < len(args):
            name, i = args[i + 1], i + 2
        elif args[i].startswith("--preset="):
            name, i = args[i].split("=", 1)[1], i + 1
        else:
            rest.append(args[i])
            i += 1
    return name, rest


def parse_config(args: list[str], prog: str) -> Config:
    """The config from ``--preset`` and field overrides (no validation)."""
    name, rest = _split_preset(args)
    try:
        base = preset(name)
    except ValueError as error:
        raise SystemExit(f"{prog}: {error}") from None
    return tyro.cli(Config, default=base, args=rest, prog=prog, description=f"{prog} (starting from preset {name!r})")


def _validated(args: list[str], prog: str) -> Config:
    config = parse_config(args, prog)
    errors = config.validate()
    if errors:
        raise SystemExit(f"{prog}: invalid config:\n  - " + "\n  - ".join(errors))
    return config


@dataclass
class SampleArgs:
    """Generate a grid of images, one per prompt and seed."""

    prompts: tuple[str, ...]
    """Prompts to sample."""
    model: str = "tiny"
    """Model: 'tiny', 'shapes', a pipeline folder or a hub id."""
    lora: str | None = None
    """A LoRA folder in diffusers format (e.g. runs/<run>/checkpoints/<epoch>/lora)."""
    num_inference_steps: int = 20
    """DDIM steps."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale."""
    eta: float = 0.0
    """DDIM η (0 = deterministic)."""
    seed: int = 0
    """Seed of the first image; image i uses the seed of sample i of epoch 0."""
    images_per_prompt: int = 1
    """Images generated for each prompt."""
    out: str = "samples.png"
    """Where the grid PNG is written."""


def sample_command(args: SampleArgs) -> Path:
    from diffalign.evaluate.plots import image_grid
    from diffalign.models import load_policy
    from diffalign.rollout import StepSettings, sample, sample_seed

    policy = load_policy(args.model)
    if args.lora:
        _load_lora_into(policy, args.lora)
    prompts = [p for p in args.prompts for _ in range(args.images_per_prompt)]
    seeds = [sample_seed(args.seed, 0, i) for i in range(len(prompts))]
    rollout = sample(policy, prompts, seeds, StepSettings(args.num_inference_steps, args.guidance_scale, args.eta))
    image_grid(rollout.images, prompts).save(args.out)
    print(f"wrote {args.out}")
    return Path(args.out)


def _load_lora_into(policy, folder: str) -> None:
    """Loads a diffusers-format LoRA folder into the policy's UNet with diffusers' own loader."""
    if not (Path(folder) / "pytorch_lora_weights.safetensors").is_file():
        raise SystemExit(f"diffalign sample: --lora {folder!r} has no pytorch_lora_weights.safetensors")
    policy.unet.load_lora_adapter(folder, prefix="unet", weight_name="pytorch_lora_weights.safetensors")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        from diffalign.train.loop import train

        result = train(_validated(rest, "diffalign train"))
        print(f"run folder: {result.run_dir}")
    elif command == "sample":
        sample_command(tyro.cli(SampleArgs, args=rest, prog="diffalign sample"))
    elif command == "config" and rest and rest[0] in ("show", "validate"):
        prog = f"diffalign config {rest[0]}"
        if rest[0] == "show":
            print(json.dumps(dataclasses.asdict(parse_config(rest[1:], prog)), indent=2))
        else:
            _validated(rest[1:], prog)
            print("config is valid")
    elif command == "reward-server":
        _reward_server(rest)
    elif command == "pretrain" and rest and rest[0] in ("shapes", "shapes-reward"):
        _pretrain(rest[0], rest[1:])
    else:
        raise SystemExit(f"diffalign: unknown command {' '.join(argv[:2])!r}\n\n{USAGE}")


@dataclass
class RewardServerArgs:
    """Serve a registered reward over HTTP (POST /score, GET /health)."""

    reward: str
    """Registered reward name."""
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 8085
    """Port to listen on."""
    device: str = "cpu"
    """Device the reward runs on."""


def _reward_server(args: list[str]) -> None:
    from diffalign import rewards
    from diffalign.rewards.http import serve

    parsed = tyro.cli(RewardServerArgs, args=args, prog="diffalign reward-server")
    try:
        reward = rewards.get(parsed.reward, device=parsed.device)
    except ValueError as error:
        raise SystemExit(f"diffalign reward-server: {error}") from None
    serve(reward, host=parsed.host, port=parsed.port)


def _pretrain(what: str, args: list[str]) -> None:
    prog = f"diffalign pretrain {what}"
    if what == "shapes":
        from diffalign.world.pretrain import PretrainConfig, pretrain

        config = tyro.cli(PretrainConfig, args=args, prog=prog)
        run = pretrain
    else:
        from diffalign.world.reward_training import RewardTrainingConfig, train_reward_model

        config = tyro.cli(RewardTrainingConfig, args=args, prog=prog)
        run = train_reward_model
    errors = config.validate() if hasattr(config, "validate") else []
    if errors:
        raise SystemExit(f"{prog}: invalid config:\n  - " + "\n  - ".join(errors))
    print(f"wrote {run(config)}")


if __name__ == "__main__":
    main()
