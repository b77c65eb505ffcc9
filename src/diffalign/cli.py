"""``diffalign COMMAND``: a table of subcommands, each parsed from its typed config with tyro.

Nothing heavy is imported until a command runs, so ``diffalign --help`` answers at once. ``train`` takes
``--preset NAME`` (the starting config) and ``--algorithm NAME`` (the method; its settings are under
``--method.*``); every other flag overrides one field (``diffalign train --help`` lists them).
"""


import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated


@dataclass(frozen=True)
class Command:
    """One subcommand: its words (``"config show"``), a line of help and what runs it with the other arguments."""

    name: str
    summary: str
    run: Callable[[list[str]], object]


def _split_flag(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Removes ``flag VALUE`` / ``flag=VALUE`` from ``args``; returns the value (None if absent) and the rest."""
    value, rest, i = None, [], 0
    while i < len(args):
        if args[i] == flag and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif args[i].startswith(flag + "="):
            value, i = args[i].split("=", 1)[1], i + 1
        else:
            rest.append(args[i])
            i += 1
    return value, rest


DEFAULT_PRESET = "ddpo-tiny"


def parse_config(args: list[str], prog: str):
    """The run config from ``--preset``, ``--algorithm`` and field overrides (no validation).

    Without ``--preset``, the method's tiny preset (``<algorithm>-tiny``) or ``ddpo-tiny``. An ``--algorithm``
    other than the preset's keeps the preset's model, sampler, reward and evaluation and takes the method's
    default settings.
    """
    import tyro

    from diffalign.config import PRESETS, Config, preset, with_algorithm

    name, rest = _split_flag(args, "--preset")
    algorithm, rest = _split_flag(rest, "--algorithm")
    if name is None:
        name = f"{algorithm}-tiny" if f"{algorithm}-tiny" in PRESETS else DEFAULT_PRESET
    try:
        base = preset(name)
        base = with_algorithm(base, algorithm) if algorithm else base
    except ValueError as error:
        raise SystemExit(f"{prog}: {error}") from None
    description = (f"{prog} (starting from preset {name!r}, method {base.algorithm!r}; choose the method with "
                   f"--algorithm NAME and the starting config with --preset NAME; presets: {', '.join(PRESETS)})")
    return tyro.cli(Config[type(base.method)], default=base, args=rest, prog=prog, description=description)


def _validated(args: list[str], prog: str):
    config = parse_config(args, prog)
    errors = config.validate()
    if errors:
        raise SystemExit(f"{prog}: invalid config:\n  - " + "\n  - ".join(errors))
    return config


def _train(args: list[str]) -> Path:
    from diffalign.train.loop import train

    result = train(_validated(args, "diffalign train"))
    print(f"run folder: {result.run_dir}")
    return result.run_dir


def _config_show(args: list[str]) -> None:
    print(json.dumps(parse_config(args, "diffalign config show").to_dict(), indent=2))


def _config_validate(args: list[str]) -> None:
    _validated(args, "diffalign config validate")
    print("config is valid")


def _sampler_defaults():
    from diffalign.config import SamplerConfig

    return SamplerConfig(num_inference_steps=20, eta=0.0, guidance_scale=5.0)


def _sample_args_class():
    import tyro

    from diffalign.config import SamplerConfig

    @dataclass
    class SampleArgs:
        """Generate a grid of images, one per prompt and seed."""

        prompts: tuple[str, ...]
        """Prompts to sample."""
        model: str = "tiny"
        """Model: 'tiny', 'shapes', a pipeline folder or a hub id."""
        lora: str | None = None
        """A LoRA folder in diffusers format (e.g. runs/<run>/checkpoints/<epoch>/lora)."""
        sampler: Annotated[SamplerConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=_sampler_defaults)
        seed: int = 0
        """Seed of the first image; image i uses the seed of sample i of epoch 0."""
        images_per_prompt: int = 1
        """Images generated for each prompt."""
        out: str = "samples.png"
        """Where the grid PNG is written."""

    return SampleArgs


def _sample(args: list[str]) -> Path:
    import tyro

    from diffalign.evaluate.plots import image_grid
    from diffalign.models import load_policy
    from diffalign.rollout import sample, sample_seed

    parsed = tyro.cli(_sample_args_class(), args=args, prog="diffalign sample")
    errors = parsed.sampler.validate()
    if errors:
        raise SystemExit("diffalign sample: invalid settings:\n  - " + "\n  - ".join(errors))
    policy = load_policy(parsed.model)
    if parsed.lora:
        _load_lora_into(policy, parsed.lora)
    prompts = [p for p in parsed.prompts for _ in range(parsed.images_per_prompt)]
    seeds = [sample_seed(parsed.seed, 0, i) for i in range(len(prompts))]
    rollout = sample(policy, prompts, seeds, parsed.sampler.settings())
    image_grid(rollout.images, prompts).save(parsed.out)
    print(f"wrote {parsed.out}")
    return Path(parsed.out)


def _load_lora_into(policy, folder: str) -> None:
    """Loads a diffusers-format LoRA folder into the policy's UNet with diffusers' own loader."""
    if not (Path(folder) / "pytorch_lora_weights.safetensors").is_file():
        raise SystemExit(f"diffalign sample: --lora {folder!r} has no pytorch_lora_weights.safetensors")
    policy.unet.load_lora_adapter(folder, prefix="unet", weight_name="pytorch_lora_weights.safetensors")


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
    import tyro

    from diffalign import rewards
    from diffalign.rewards.http import serve

    parsed = tyro.cli(RewardServerArgs, args=args, prog="diffalign reward-server")
    try:
        reward = rewards.get(parsed.reward, device=parsed.device)
    except ValueError as error:
        raise SystemExit(f"diffalign reward-server: {error}") from None
    serve(reward, host=parsed.host, port=parsed.port)


def _pretrain(what: str) -> Callable[[list[str]], Path]:
    def run(args: list[str]) -> Path:
        import tyro

        if what == "shapes":
            from diffalign.train.pretrain_shapes import PretrainConfig as Settings
            from diffalign.train.pretrain_shapes import pretrain as recipe
        else:
            from diffalign.train.reward_training import RewardTrainingConfig as Settings
            from diffalign.train.reward_training import train_reward_model as recipe
        prog = f"diffalign pretrain {what}"
        config = tyro.cli(Settings, args=args, prog=prog)
        errors = config.validate()
        if errors:
            raise SystemExit(f"{prog}: invalid config:\n  - " + "\n  - ".join(errors))
        path = recipe(config)
        print(f"wrote {path}")
        return path

    return run


COMMANDS = [
    Command("train", "train a model with a method (--algorithm NAME, --preset NAME; see `diffalign train --help`)",
            _train),
    Command("sample", "generate an image grid from a model (optionally with a trained LoRA)", _sample),
    Command("config show", "print the resolved config as JSON (same flags as train)", _config_show),
    Command("config validate", "check a config and list every problem", _config_validate),
    Command("reward-server", "serve a registered reward over HTTP", _reward_server),
    Command("pretrain shapes", "train the ShapesWorld base model", _pretrain("shapes")),
    Command("pretrain shapes-reward", "train the learned, differentiable ShapesWorld reward", _pretrain("shapes-reward")),
]


def usage() -> str:
    width = max(len(c.name) for c in COMMANDS) + 2
    lines = "\n".join(f"  {c.name:<{width}}{c.summary}" for c in COMMANDS)
    return f"usage: diffalign COMMAND [FLAGS]   (diffalign COMMAND --help lists a command's flags)\n\ncommands:\n{lines}\n"


def main(argv: list[str] | None = None) -> object:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return None
    for command in sorted(COMMANDS, key=lambda c: -len(c.name.split())):
        words = command.name.split()
        if argv[: len(words)] == words:
            return command.run(argv[len(words) :])
    raise SystemExit(f"diffalign: unknown command {' '.join(argv[:2])!r}\n\n{usage()}")


if __name__ == "__main__":
    main()
