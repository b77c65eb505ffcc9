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
        guide: Literal["none", "rcgd"] = "none"
        """Reward-directed guidance toward a target reward (rcgd: needs --reward-model)."""
        reward_model: str | None = None
        """rcgd: folder of a reward model trained on this model's latents (`diffalign reward-model train`)."""
        target: float = 1.0
        """rcgd: the target reward y*."""
        guidance: float = 100.0
        """rcgd: guidance strength G (= 1/σ² of the reward likelihood)."""
        allow_extrapolation: bool = False
        """rcgd: allow a target outside the reward model's label range."""
        compile: bool = False
        """torch.compile the denoiser: the first steps pay the compilation, later ones run faster (for many images;
        see benchmarks/bench_compile.py)."""

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
    guide, guide_config = _guide(parsed)
    if parsed.guide != "none" and parsed.steer != "none":
        errors.append(f"--guide {parsed.guide} and --steer {parsed.steer} cannot be combined; choose one")
    if parsed.guide == "rcgd":
        errors += guide_config.validate(settings, guide)
    if Path(parsed.out).exists() and not Path(parsed.out).is_dir():
        errors.append(f"--out {parsed.out!r} is a file, not a folder")
    if errors:
        raise SystemExit(f"{prog}: invalid settings:\n  - " + "\n  - ".join(errors))
    try:
        policy = load_policy(parsed.model)
    except ValueError as error:
        raise SystemExit(f"{prog}: --model: {error}") from None
    try:
        policy.schedule.timesteps(settings.num_inference_steps)
    except ValueError as error:
        raise SystemExit(f"{prog}: --num-inference-steps {settings.num_inference_steps} does not fit model "
                         f"{parsed.model!r}: {error}") from None
    if parsed.lora:
        _load_lora_into(policy, parsed.lora)
    if parsed.compile:
        policy.unet.compile()
    reward = rewards.get(parsed.reward, device=policy.device) if parsed.reward else None
    errors = config.validate(settings, reward) if config is not None else []
    if errors:
        raise SystemExit(f"{prog}: invalid settings:\n  - " + "\n  - ".join(errors))
    prompts = [p for p in parsed.prompts for _ in range(parsed.images_per_prompt)]
    predicted = None
    if config is not None:
        result = steerer(parsed.steer).run(policy, prompts, reward, settings, config, parsed.seed)
        images, scores, meter = result.images, result.rewards, result
    elif guide is not None:
        try:
            result = steerer("rcgd").run(policy, prompts, guide, settings, guide_config, parsed.seed)
        except ValueError as error:
            raise SystemExit(f"{prog}: --reward-model {parsed.reward_model}: {error}") from None
        images, predicted, meter = result.images, result.rewards, result
        scores = Meter().score(reward, images, prompts) if reward is not None else None
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
              "guide": parsed.guide, "guidance": dataclasses.asdict(guide_config) if guide else None,
              "reward_model": parsed.reward_model if guide else None,
              "rewards": None if scores is None else scores.detach().cpu().tolist(),
              "predicted_rewards": None if predicted is None else predicted.tolist(),
              "reward_calls": meter.reward_calls, "denoiser_passes": meter.denoiser_passes,
              "gradient_passes": meter.gradient_passes}
    (out / "sample.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {len(prompts)} images, grid.png and sample.json to {out}")
    return out


def _guide(parsed):
    """The latent reward model and RCGD config of ``--guide rcgd`` ((None, None) without it)."""
    from diffalign.models.latent_reward import LatentRewardModel
    from diffalign.steering import RCGDConfig

    if parsed.guide == "none":
        if parsed.reward_model is not None:
            raise SystemExit("diffalign sample: --reward-model is used by --guide rcgd; add --guide rcgd")
        return None, None
    if parsed.reward_model is None:
        raise SystemExit("diffalign sample: --guide rcgd needs --reward-model DIR (`diffalign reward-model train`)")
    try:
        model = LatentRewardModel.load(parsed.reward_model)
    except ValueError as error:
        raise SystemExit(f"diffalign sample: --reward-model: {error}") from None
    return model, RCGDConfig(parsed.target, parsed.guidance, parsed.allow_extrapolation)


def _load_lora_into(policy, folder: str) -> None:
    """Loads a diffusers-format LoRA folder into the policy's UNet with diffusers' own loader."""
    if not (Path(folder) / "pytorch_lora_weights.safetensors").is_file():
        raise SystemExit(f"LoRA folder {folder!r} has no pytorch_lora_weights.safetensors (a diffusers-format LoRA "
                         "such as runs/<run>/checkpoints/<epoch>/lora)")
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
    from diffalign.serve.reward_server import serve

    parsed = tyro.cli(RewardServerArgs, args=args, prog="diffalign reward-server")
    try:
        reward = rewards.get(parsed.reward, device=parsed.device)
    except ValueError as error:
        raise SystemExit(f"diffalign reward-server: {error}") from None
    serve(reward, host=parsed.host, port=parsed.port)


def _serve(args: list[str]) -> None:
    import tyro

    from diffalign.serve.app import ServeConfig, serve

    prog = "diffalign serve"
    config = tyro.cli(ServeConfig, args=args, prog=prog)
    errors = config.validate()
    if errors:
        raise SystemExit(f"{prog}: invalid settings:\n  - " + "\n  - ".join(errors))
    try:
        serve(config)
    except ValueError as error:  # a --model that does not parse or load
        raise SystemExit(f"{prog}: {error}") from None


def _reward_model_train(args: list[str]) -> Path:
    import tyro

    from diffalign.train.latent_reward import LatentRewardTrainingConfig, train_latent_reward

    prog = "diffalign reward-model train"
    config = tyro.cli(LatentRewardTrainingConfig, args=args, prog=prog)
    try:
        out = train_latent_reward(config)
    except ValueError as error:
        raise SystemExit(f"{prog}: {error}") from None
    final = json.loads((out / "metrics.json").read_text())["final"]
    print(f"held-out MSE {final['mse']:.4g} (clean latents {final['mse_clean']:.4g}; label variance "
          f"{final['label_variance']:.4g}); wrote {out}")
    return out


@dataclass
class TrackArgs:
    """Sample with RCGD at several targets and guidance strengths; write tracking.json, tracking.png (achieved
    ground-truth and predicted reward against the target) and grid_guidance_G.png (a row of samples per target)."""

    reward_model: str
    """Folder of the reward model (`diffalign reward-model train`)."""
    out: str
    """Folder for tracking.json and tracking.png."""
    model: str | None = None
    """Model to sample (default: the one the reward model was trained on)."""
    targets: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Target rewards y*."""
    guidances: tuple[float, ...] = (0.0, 10.0, 100.0)
    """Guidance strengths G (0: plain sampling, the baseline)."""
    prompts: str | None = None
    """Prompt source (default: shapes for the shapes model, else simple_animals)."""
    num_prompts: int = 64
    """Prompts drawn (one sample each, the same prompts and seeds in every cell)."""
    judge: str | None = None
    """Registered reward that scores the samples (default: the one that labelled the reward model's data)."""
    steps: int = 20
    """DDIM steps."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale."""
    seed: int = 0
    """Seed of the prompts and the samples."""
    allow_extrapolation: bool = False
    """Allow targets outside the reward model's label range."""


def _reward_model_track(args: list[str]) -> Path:
    import dataclasses

    import torch
    import tyro

    from diffalign import prompts as prompt_sources
    from diffalign import rewards
    from diffalign.evaluate.plots import image_grid
    from diffalign.evaluate.target_tracking import plot_target_tracking, target_tracking
    from diffalign.models import load_policy
    from diffalign.models.latent_reward import LatentRewardModel
    from diffalign.rollout import StepSettings

    prog = "diffalign reward-model track"
    parsed = tyro.cli(TrackArgs, args=args, prog=prog)
    try:
        reward_model = LatentRewardModel.load(parsed.reward_model)
        model = parsed.model or reward_model.config.model
        judge = rewards.get(parsed.judge or reward_model.config.labels)
        source = prompt_sources.get(parsed.prompts or ("shapes" if model == "shapes" else "simple_animals"))
        policy = load_policy(model)
        prompts = source.draw(parsed.num_prompts, torch.Generator().manual_seed(parsed.seed))
        rows, previews = target_tracking(policy, reward_model, judge, prompts,
                                         StepSettings(parsed.steps, parsed.guidance_scale), parsed.targets,
                                         parsed.guidances, parsed.seed, parsed.allow_extrapolation)
    except ValueError as error:
        raise SystemExit(f"{prog}: {error}") from None
    out = Path(parsed.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"settings": dataclasses.asdict(parsed) | {"model": model, "judge": judge.name},
              "label_range": [reward_model.config.label_min, reward_model.config.label_max], "rows": rows}
    (out / "tracking.json").write_text(json.dumps(record, indent=2))
    plot_target_tracking(rows, out / "tracking.png", f"RCGD on {model}: {judge.name}")
    for guidance in parsed.guidances:  # one grid per guidance: a row of the same prompts and seeds per target
        cells = [i for i, row in enumerate(rows) if row["guidance"] == guidance]
        image_grid(torch.cat([previews[i] for i in cells]), [f"y* {rows[i]['target']:g}" for i in cells
                                                             for _ in range(len(previews[i]))],
                   columns=len(previews[cells[0]])).save(out / f"grid_guidance_{guidance:g}.png")
    for row in rows:
        print(f"G {row['guidance']:>7g}  target {row['target']:>6.3g}  reward {row['reward_mean']:.3f} "
              f"± {row['reward_std']:.3f}  predicted {row['predicted_mean']:.3f}  diversity {row['diversity']}")
    print(f"wrote {out / 'tracking.json'}, {out / 'tracking.png'} and the grids to {out}")
    return out


@dataclass
class EvalArgs:
    """Sample the same prompts and seeds at several step counts and score them (step generalisation); writes
    step_generalisation.json and step_generalisation.png and prints a table."""

    run_dir: tuple[str, ...] = ()
    """Run folders to evaluate (each at its latest checkpoint's LoRA, on its own evaluation sets and judges)."""
    model: tuple[str, ...] = ()
    """Base models to evaluate ('shapes', 'shapes-turbo', 'tiny', a folder or hub id; several after one flag:
    --model shapes shapes-turbo), on the evaluation sets of --preset."""
    preset: str | None = None
    """Preset whose evaluation sets and judges a base model is scored with (default: the first run's config, else
    ddpo-shapes for the ShapesWorld models and ddpo-tiny otherwise)."""
    steps: str = "1,2,4,8"
    """Step counts, comma-separated."""
    samples: int | None = None
    """Prompts per evaluation set (default: the config's eval.samples)."""
    guidance_scale: float | None = None
    """Classifier-free guidance for every model (default: each config's; few-step models such as shapes-turbo are
    sampled with 1)."""
    out: str | None = None
    """Folder for the outputs (default: the run folder when there is exactly one, else eval/)."""


def _evaluated_configs(parsed: EvalArgs) -> list[tuple[str, object, str | None]]:
    """(label, config, LoRA folder or None) for every run folder and base model asked for."""
    from diffalign.config import config_from_dict, preset, replace
    from diffalign.models import resolve_model
    from diffalign.train.checkpoint import latest_checkpoint

    entries = []
    for run_dir in parsed.run_dir:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"--run-dir {run_dir!r} has no config.json (not a run folder)")
        config = config_from_dict(json.loads(path.read_text()))
        if not config.model.use_lora:
            raise ValueError(f"--run-dir {run_dir!r} fine-tuned the whole UNet; eval loads LoRA runs only")
        entries.append((Path(run_dir).name, config, str(latest_checkpoint(run_dir) / "lora")))
    first_run = entries[0][1] if entries else None
    for name in parsed.model:
        try:
            resolve_model(name)
        except ValueError as error:
            raise ValueError(f"--model: {error}") from None
        if parsed.preset is not None:
            base = preset(parsed.preset)
        else:
            base = first_run or preset("ddpo-shapes" if name.startswith("shapes") else "ddpo-tiny")
        entries.append((f"{name} (base)", replace(base, **{"model.name": name}), None))
    if not entries:
        raise ValueError("nothing to evaluate: give --run-dir DIR and/or --model NAME")
    overrides = {key: value for key, value in (("eval.samples", parsed.samples),
                                                ("sample.guidance_scale", parsed.guidance_scale)) if value is not None}
    return [(label, replace(config, **overrides), lora) for label, config, lora in entries]


def _eval(args: list[str]) -> Path:
    import tyro

    from diffalign import prompts as prompt_sources
    from diffalign.evaluate.step_generalisation import (
        markdown_table, parse_steps, plot_step_generalisation, step_generalisation,
    )
    from diffalign.models import load_policy
    from diffalign.train.loop import evaluation_sets

    prog = "diffalign eval"
    parsed = tyro.cli(EvalArgs, args=args, prog=prog)
    try:
        steps = parse_steps(parsed.steps)
        entries = _evaluated_configs(parsed)
    except ValueError as error:
        raise SystemExit(f"{prog}: {error}") from None
    results, judge_names = {}, set()
    for label, config, lora in entries:
        policy = load_policy(config.model.name)
        if lora is not None:
            _load_lora_into(policy, lora)
        policy.unet.eval()
        reward, gold = config.reward.build(policy.device)
        judges = {"reward": reward, **({"gold": gold} if gold is not None else {})}
        judge_names.update(judges)
        sets = evaluation_sets(config, prompt_sources.get(config.prompts))
        results[label] = step_generalisation(policy, sets, config.sample.settings(), judges, steps,
                                             config.sample.batch_size_per_device)
    out = Path(parsed.out or (parsed.run_dir[0] if len(parsed.run_dir) == 1 and not parsed.model else "eval"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_generalisation.json").write_text(json.dumps({"steps": steps, "results": results}, indent=2))
    keys = [k for k in ("heldout_strict_accuracy", "train_strict_accuracy", "heldout_reward_mean",
                        "train_reward_mean", "diversity_diversity") if any(k in r for rows in results.values() for r in rows)]
    plot_step_generalisation(results, keys[:3], out / "step_generalisation.png")
    for key in keys:
        print(markdown_table(results, key), end="\n\n")
    print(f"wrote {out / 'step_generalisation.json'} and {out / 'step_generalisation.png'}")
    return out


def _pretrain(what: str) -> Callable[[list[str]], Path]:
    def run(args: list[str]) -> Path:
        import tyro

        if what == "shapes":
            from diffalign.train.pretrain_shapes import PretrainConfig as Settings
            from diffalign.train.pretrain_shapes import pretrain as recipe
        elif what == "shapes-turbo":
            from diffalign.train.distill_shapes import DistillConfig as Settings
            from diffalign.train.distill_shapes import distill as recipe
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
    Command("serve", "serve models over HTTP with a web page to generate from, steer and compare them", _serve),
    Command("pretrain shapes", "train the ShapesWorld base model", _pretrain("shapes")),
    Command("pretrain shapes-turbo", "distil the ShapesWorld base into a few-step model (the shapes-turbo cache)",
            _pretrain("shapes-turbo")),
    Command("eval", "score runs and base models at several step counts (--steps 1,2,4,8)", _eval),
    Command("reward-model train", "train a reward model on a model's VAE latents (for --guide rcgd)",
            _reward_model_train),
    Command("reward-model track", "RCGD's achieved reward against the target, per guidance strength",
            _reward_model_track),
    Command("pretrain shapes-reward", "train the learned, differentiable ShapesWorld reward", _pretrain("shapes-reward")),
]


def usage() -> str:
    width = max(len(c.name) for c in COMMANDS) + 2
    lines = "\n".join(f"  {c.name:<{width}}{c.summary}" for c in COMMANDS)
    return f"usage: diffalign COMMAND [FLAGS]   (diffalign COMMAND --help lists a command's flags)\n\ncommands:\n{lines}\n"


def main(argv: list[str] | None = None) -> None:
    """The ``diffalign`` console script: runs the command (exit status 0 unless it raises SystemExit)."""
    run(argv)


def run(argv: list[str] | None = None) -> object:
    """Runs the command ``argv`` (default: the process's arguments) and returns what it returned (e.g. a path)."""
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
