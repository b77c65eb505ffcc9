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
from typing import Annotated, Literal


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

    return SamplerConfig(num_inference_steps=20, eta=1.0, guidance_scale=5.0)


STEER_CHOICES = ("none", "best-of-n", "fk", "svdd", "guidance")


def _sample_args_class():
    import tyro

    from diffalign.config import SamplerConfig

    @dataclass
    class SampleArgs:
        """Generate images, one per prompt and seed, optionally steered by a reward at test time.

        Writes DIR/0000.png, … (one per image), DIR/grid.png and DIR/sample.json (the settings, per-image rewards
        and the compute spent: reward_calls, denoiser_passes, gradient_passes)."""

        prompts: Annotated[tuple[str, ...], tyro.conf.arg(aliases=("--prompt",))]
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
        out: str = "samples"
        """Folder the images, grid.png and sample.json are written to."""
        steer: Literal[STEER_CHOICES] = "none"  # type: ignore[valid-type]
        """Test-time steering method (needs --reward): best-of-n, fk, svdd or guidance."""
        particles: int = 4
        """Steering width: samples (best-of-n, guidance), particles (fk) or candidates per step (svdd)."""
        reward: str | None = None
        """Registered reward that steers (and scores) the images."""
        potential: str = "diff"
        """fk: potential (diff, max, add, rt)."""
        lam: float = 10.0
        """fk: λ, the potential's inverse temperature."""
        resample_every: int = 5
        """fk: steps between resampling steps (the first at this step)."""
        temperature: float = 0.0
        """svdd: α of the candidate weights (0: argmax)."""
        gradient_scale: float = 1.0
        """guidance: step size on the reward's gradient."""
        repeats: int = 1
        """guidance: times each step is taken (re-noising in between)."""

    return SampleArgs


def _steering_config(parsed):
    from diffalign.steering import BestOfNConfig, FKConfig, GuidanceConfig, SVDDConfig

    k = parsed.particles
    return {"best-of-n": lambda: BestOfNConfig(k),
            "fk": lambda: FKConfig(k, parsed.potential, parsed.lam, parsed.resample_every, parsed.resample_every),
            "svdd": lambda: SVDDConfig(k, parsed.temperature),
            "guidance": lambda: GuidanceConfig(k, parsed.gradient_scale, parsed.repeats)}[parsed.steer]()


def _sample(args: list[str]) -> Path:
    import dataclasses

    import tyro
    from PIL import Image

    from diffalign import rewards
    from diffalign.evaluate.plots import image_grid
    from diffalign.images import to_uint8
    from diffalign.models import load_policy
    from diffalign.steering import Meter, steerer
    from diffalign.steering.base import Particles, propagate

    prog = "diffalign sample"
    parsed = tyro.cli(_sample_args_class(), args=args, prog=prog)
    settings = parsed.sampler.settings()
    errors = parsed.sampler.validate()
    if parsed.steer != "none" and parsed.reward is None:
        errors.append(f"--steer {parsed.steer} needs --reward NAME (one of {', '.join(rewards.names())})")
    if parsed.reward is not None and parsed.reward not in rewards.names():
        errors.append(f"--reward {parsed.reward!r} is not registered; choose one of {', '.join(rewards.names())}")
    config = _steering_config(parsed) if parsed.steer != "none" else None
    if config is not None:
        errors += config.validate(settings, None)
    if errors:
        raise SystemExit(f"{prog}: invalid settings:\n  - " + "\n  - ".join(errors))
    policy = load_policy(parsed.model)
    if parsed.lora:
        _load_lora_into(policy, parsed.lora)
    reward = rewards.get(parsed.reward, device=policy.device) if parsed.reward else None
    errors = config.validate(settings, reward) if config is not None else []
    if errors:
        raise SystemExit(f"{prog}: invalid settings:\n  - " + "\n  - ".join(errors))
    prompts = [p for p in parsed.prompts for _ in range(parsed.images_per_prompt)]
    if config is not None:
        result = steerer(parsed.steer).run(policy, prompts, reward, settings, config, parsed.seed)
        images, scores, meter = result.images, result.rewards, result
    else:
        meter = Meter()
        images = policy.decode(propagate(policy, Particles.of(prompts, 1, parsed.seed), settings, meter))
        scores = meter.score(reward, images, prompts) if reward is not None else None
    out = Path(parsed.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(to_uint8(images).numpy()):
        Image.fromarray(array).save(out / f"{i:04d}.png")
    image_grid(images, prompts).save(out / "grid.png")
    record = {"model": parsed.model, "lora": parsed.lora, "seed": parsed.seed,
              "sampler": dataclasses.asdict(parsed.sampler), "steer": parsed.steer,
              "steering": dataclasses.asdict(config) if config else None, "reward": parsed.reward, "prompts": prompts,
              "rewards": None if scores is None else scores.detach().cpu().tolist(),
              "reward_calls": meter.reward_calls, "denoiser_passes": meter.denoiser_passes,
              "gradient_passes": meter.gradient_passes}
    (out / "sample.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {len(prompts)} images, grid.png and sample.json to {out}")
    return out


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
    Command("sample", "generate images from a model (optionally with a trained LoRA, steered by a reward)", _sample),
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
