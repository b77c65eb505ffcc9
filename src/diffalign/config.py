"""Typed run configuration and presets. Every field's docstring becomes its ``--help`` line (tyro).

A run's config is composed of reusable pieces — model, sampling, reward (+ gold), evaluation, optimizer — that
``sample`` and the other commands share, and the method's own config (``method``, a dataclass declared in the
method's file). Sizes are per device (``*_per_device``); a preset never names a hardware count. Every config has
one contract: ``validate() -> list[str]`` gathers every error at once, naming the field, the value and what is
allowed, and ``check()`` raises with all of them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar

from diffalign.algorithms import ALGORITHMS, MethodConfig, algorithm_name
from diffalign.algorithms.actor_critic import ActorCriticConfig
from diffalign.algorithms.advantages import AdvantageConfig
from diffalign.algorithms.ddpo import DDPOConfig
from diffalign.algorithms.dag import DagConfig
from diffalign.algorithms.dav import DavConfig
from diffalign.algorithms.draft import DraftConfig
from diffalign.algorithms.raft import RaftConfig
from diffalign.algorithms.reinforce import ReinforceConfig
from diffalign.algorithms.sdpo import SDPOConfig
from diffalign.algorithms.trpo import TRPOConfig
from diffalign.models.lora import DEFAULT_TARGET_MODULES
from diffalign.rollout import StepSettings


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Model: 'tiny' (random, for tests), 'shapes' (the embedded ShapesWorld model), a pipeline folder or a hub id."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    use_lora: bool = True
    """Train a LoRA adapter on the UNet (else fine-tune the whole UNet)."""
    lora_rank: int = 4
    """LoRA rank r."""
    lora_alpha: float = 4.0
    """LoRA alpha (the update is scaled by alpha / rank)."""
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """UNet modules that get LoRA adapters."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """accelerate mixed precision; the frozen VAE and text encoder run in this dtype. Log-probs stay fp32."""

    def validate(self) -> list[str]:
        errors = []
        if self.lora_rank < 1:
            errors.append(f"model.lora_rank must be >= 1, got {self.lora_rank}")
        if not 0 < self.lora_alpha < math.inf:
            errors.append(f"model.lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if not self.lora_target_modules or not all(name.strip() for name in self.lora_target_modules):
            errors.append(f"model.lora_target_modules must name at least one UNet module (e.g. "
                          f"{', '.join(DEFAULT_TARGET_MODULES)}), got {self.lora_target_modules!r}")
        return errors


@dataclass
class SamplerConfig:
    """How one trajectory is sampled: steps, stochasticity, guidance, log-prob reduction (shared by every command)."""

    num_inference_steps: int = 50
    """DDIM steps per trajectory."""
    eta: float = 1.0
    """DDIM stochasticity η (1 = DDPM posterior variance, 0 = deterministic). Policy-gradient methods need η > 0."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale w (1 = no guidance)."""
    logprob_reduction: Literal["mean", "sum"] = "mean"
    """How per-step log-probs are reduced over pixels: mean (DDPO; keeps ratios sane) or sum (exact density)."""

    def settings(self) -> StepSettings:
        return StepSettings(self.num_inference_steps, self.guidance_scale, self.eta, self.logprob_reduction)

    def validate(self) -> list[str]:
        errors = []
        if self.num_inference_steps < 1:
            errors.append(f"sample.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not 0 <= self.guidance_scale < math.inf:
            errors.append(f"sample.guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if not 0 <= self.eta < math.inf:
            errors.append(f"sample.eta must be a finite number >= 0, got {self.eta}")
        return errors


@dataclass
class SampleConfig(SamplerConfig):
    """The sampler and how many trajectories an epoch of training draws."""

    batch_size_per_device: int = 1
    """Trajectories sampled per device per sampling batch."""
    num_batches_per_epoch: int = 2
    """Sampling batches per device per epoch."""
    samples_per_prompt: int = 1
    """Samples of each drawn prompt per epoch, next to each other (1: every sample draws its own prompt, as DDPO).
    With k > 1 and a stat tracker whose min_count <= k, each prompt's advantages are normalised within its own
    group at once, so prompt difficulty no longer masquerades as sample quality. Must divide the samples per
    device."""

    @property
    def samples_per_device(self) -> int:
        return self.batch_size_per_device * self.num_batches_per_epoch


@dataclass
class TrainConfig:
    """The optimizer and how a method's micro-batches are sized (the method decides what a micro-batch holds)."""

    batch_size_per_device: int = 1
    """Trajectories per training micro-batch per device."""
    gradient_accumulation_steps: int = 1
    """Micro-batches of trajectories per optimizer step (a method may split each further, e.g. DDPO by step)."""
    learning_rate: float = 3e-4
    """AdamW learning rate."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.999
    """AdamW β2."""
    adam_weight_decay: float = 1e-4
    """AdamW weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW ε."""
    max_grad_norm: float = 1.0
    """Gradient norm clipping threshold."""
    skip_nonfinite_steps: bool = False
    """Skip an optimizer step whose loss or gradient norm is NaN or infinite (gradients zeroed; counted per epoch
    as train/skipped_steps) instead of stopping the run with an error naming the epoch, the method and the value."""

    def validate(self) -> list[str]:
        """The optimizer's ranges (AdamW's own checks, raised here before anything runs), and a positive clipping
        threshold (a negative one would flip every gradient)."""
        errors = [f"train.{name} must be {rule}, got {value}"
                  for name, value, ok, rule in [
                      ("learning_rate", self.learning_rate, 0 <= self.learning_rate < math.inf, "a finite number >= 0"),
                      ("adam_beta1", self.adam_beta1, 0 <= self.adam_beta1 < 1, "in [0, 1)"),
                      ("adam_beta2", self.adam_beta2, 0 <= self.adam_beta2 < 1, "in [0, 1)"),
                      ("adam_weight_decay", self.adam_weight_decay, 0 <= self.adam_weight_decay < math.inf,
                       "a finite number >= 0"),
                      ("adam_epsilon", self.adam_epsilon, 0 <= self.adam_epsilon < math.inf, "a finite number >= 0"),
                      ("max_grad_norm", self.max_grad_norm, self.max_grad_norm > 0, "> 0")] if not ok]
        return errors


@dataclass
class RewardConfig:
    """The reward a run trains on and, optionally, a gold reward it is judged by."""

    name: str = "jpeg_compressibility"
    """Registered reward name (see `diffalign.rewards.names()`)."""
    kwargs: dict[str, str] = field(default_factory=dict)
    """Keyword arguments of the reward's constructor, e.g. local weight paths (`--reward.kwargs key value`); values
    are converted to the types the reward declares."""
    gold: str | None = None
    """A second registered reward the run is judged by but not trained on (reward-hacking curves): logged per
    epoch as reward/gold_mean on the training samples and in every evaluation. Training on the learned ShapesWorld
    reward (shapes_learned) without one, the verifiable `shapes` reward is the gold."""
    gold_kwargs: dict[str, str] = field(default_factory=dict)
    """Keyword arguments of the gold reward's constructor."""
    async_scoring: bool = True
    """Score each sampling batch in a worker thread while the next batch samples."""

    def validate(self) -> list[str]:
        from diffalign import rewards
        from diffalign.rewards.registry import converted_kwargs

        errors = []
        rewards_and_kwargs = [("reward.name", self.name, "reward.kwargs", self.kwargs),
                              ("reward.gold", self.gold_name, "reward.gold_kwargs", self.gold_kwargs)]
        for label, name, kwargs_label, kwargs in rewards_and_kwargs:
            if name is None:
                if kwargs:
                    errors.append(f"{kwargs_label} {kwargs!r} given without {label}")
            elif name not in rewards.names():
                errors.append(f"{label}: reward {name!r} is not registered; choose one of {', '.join(rewards.names())}")
            elif "device" in kwargs:
                errors.append(f"{kwargs_label}: 'device' is not a reward keyword here (the run places its rewards)")
            else:
                try:
                    converted_kwargs(name, kwargs)
                except ValueError as error:
                    errors.append(f"{kwargs_label}: {error}")
        return errors

    def differentiability_errors(self, algorithm: str) -> list[str]:
        """An error when ``algorithm`` backpropagates through a reward this registry knows is not differentiable."""
        from diffalign.rewards.registry import declared_differentiable

        if declared_differentiable(self.name) is False:
            return [f"reward.name: {algorithm} backpropagates through the reward, but {self.name!r} is not "
                    "differentiable; choose a differentiable one (e.g. shapes_learned, aesthetic, pickscore, "
                    "clipscore, brightness)"]
        return []

    def build(self, device) -> tuple:
        """(trained-on reward, gold reward or None) on ``device``."""
        from diffalign import rewards

        reward = rewards.get(self.name, device=device, **self.kwargs)
        gold = rewards.get(self.gold_name, device=device, **self.gold_kwargs) if self.gold_name else None
        return reward, gold

    @property
    def gold_name(self) -> str | None:
        """The gold reward: ``gold``, or ``shapes`` when training on ``shapes_learned`` without one."""
        return self.gold or ("shapes" if self.name == "shapes_learned" else None)


@dataclass
class EvalConfig:
    """Fixed prompts and seeds a run is evaluated on before, during and after training."""

    prompts: str | None = None
    """Held-out prompt source (e.g. shapes_heldout) evaluated besides the training prompts."""
    samples: int = 16
    """Samples per evaluation split (fixed prompts and seeds, the same at every evaluation)."""
    freq: int = 0
    """Evaluate every this many epochs besides before and after training (0: only before and after)."""
    diversity_prompts: int = 0
    """Training prompts of an extra set sampled diversity_samples times each, reported as diversity (0: none)."""
    diversity_samples: int = 4
    """Samples per prompt of the diversity set."""
    kl_samples: int = 4
    """Trajectories of each epoch's batch (per device) on which kl/to_base is measured after the update (0: off)."""
    kl_steps: int = 4
    """Denoising steps (drawn at random each epoch) kl/to_base is computed on, scaled to the whole chain."""
    step_grad_norms: bool = False
    """Log grad_norm/step_<j> every epoch: the norm of the method's gradient at each denoising step j over the
    epoch's samples, before the update (one more forward and backward pass per sample and step; plotted in the
    report). For the methods that train on single denoising steps (ddpo, reinforce, dag)."""

    def validate(self) -> list[str]:
        from diffalign import prompts

        errors = [f"eval.{name} must be >= {low}, got {value}"
                  for name, value, low in [("samples", self.samples, 1), ("freq", self.freq, 0),
                                           ("diversity_prompts", self.diversity_prompts, 0),
                                           ("diversity_samples", self.diversity_samples, 2),
                                           ("kl_samples", self.kl_samples, 0),
                                           ("kl_steps", self.kl_steps, 1)] if value < low]
        if self.prompts is not None:
            try:
                prompts.check(self.prompts)
            except ValueError as error:
                errors.append(f"eval.prompts: {error}")
        return errors


M = TypeVar("M", bound=MethodConfig)


@dataclass
class Config(Generic[M]):
    """One training run: the method (its own config) on a model, sampler, reward, evaluation and optimizer."""

    method: M = field(default_factory=DDPOConfig)
    """The training method's settings (choose the method with --algorithm)."""
    preset: str = "custom"
    """Name of the preset this config started from (informational)."""
    prompts: str = "imagenet_animals"
    """Registered prompt source or a path to a text file with one prompt per line."""
    epochs: int = 100
    """Number of epochs (sample → reward → train) to run in total, including resumed ones."""
    seed: int = 42
    """Run seed: every sample's noise and every shuffle derive from it."""
    run_dir: str | None = None
    """Where the run folder is written (default runs/<preset>-<time>)."""
    resume: str | None = None
    """Resume from a checkpoint folder, or from the latest checkpoint of a run folder."""
    resume_fallback: bool = False
    """When the latest checkpoint of the run folder given to `resume` is incomplete or corrupted, resume from the
    newest complete one before it (logging which was skipped and why) instead of stopping with an error."""
    save_freq: int = 20
    """Save a checkpoint every this many epochs (and after the last)."""
    keep_last: int | None = None
    """Keep only the newest this many checkpoints, deleting older ones once a new one is complete (None or 0:
    keep all)."""
    time_budget_minutes: float | None = None
    """Stop after the epoch at which this many minutes of training (sampling, reward, updates; not evaluation)
    have passed in this process, even before `epochs` (for comparisons under equal wall-clock budgets)."""
    log_with: Literal["tensorboard", "wandb", "mlflow", "none"] = "tensorboard"
    """Experiment tracker (through accelerate), besides metrics.jsonl."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def algorithm(self) -> str:
        """The registered name of the method (from the type of ``method``)."""
        return algorithm_name(self.method)

    def to_dict(self) -> dict:
        """The resolved config as JSON-able data, with the method's name."""
        return {"algorithm": self.algorithm, **dataclasses.asdict(self)}

    def validate(self) -> list[str]:
        """Every problem with this config, each naming the field, the value and what is allowed. Fields of the
        wrong type (or NaN) are reported alone: the other rules cannot be checked on them."""
        from diffalign import prompts
        from diffalign.models import resolve_model
        from diffalign.models import Schedule
        from diffalign.models.loading import scheduler_config

        errors = type_errors(self)
        if errors:
            return errors
        s, t = self.sample, self.train
        for name, value in [("sample.batch_size_per_device", s.batch_size_per_device),
                            ("sample.num_batches_per_epoch", s.num_batches_per_epoch),
                            ("train.batch_size_per_device", t.batch_size_per_device),
                            ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                            ("epochs", self.epochs), ("save_freq", self.save_freq),
                            ("sample.samples_per_prompt", s.samples_per_prompt)]:
            if value < 1:
                errors.append(f"{name} must be >= 1, got {value}")
        errors += self.model.validate() + s.validate() + t.validate()
        if not 0 <= self.seed < 2**32:
            errors.append(f"seed must be in [0, 2**32 - 1] (numpy's seed range), got {self.seed}")
        errors += _path_errors(self.run_dir, self.resume)
        if self.keep_last is not None and self.keep_last < 0:
            errors.append(f"keep_last must be >= 0 (0 or None: keep every checkpoint), got {self.keep_last}")
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            errors.append(f"time_budget_minutes must be > 0, got {self.time_budget_minutes}")
        if s.samples_per_prompt >= 1 and s.samples_per_device % s.samples_per_prompt:
            errors.append(f"sample.samples_per_prompt ({s.samples_per_prompt}) must divide the samples per device per "
                          f"epoch (sample.batch_size_per_device × sample.num_batches_per_epoch = "
                          f"{s.samples_per_device})")
        if t.batch_size_per_device >= 1 and s.samples_per_device % t.batch_size_per_device:
            errors.append(
                f"train.batch_size_per_device ({t.batch_size_per_device}) must divide the samples per device per "
                f"epoch (sample.batch_size_per_device × sample.num_batches_per_epoch = {s.samples_per_device})")
        elif t.batch_size_per_device >= 1 and t.gradient_accumulation_steps >= 1:
            minibatches = s.samples_per_device // t.batch_size_per_device
            if minibatches % t.gradient_accumulation_steps:
                errors.append(
                    f"train.gradient_accumulation_steps ({t.gradient_accumulation_steps}) must divide the "
                    f"minibatches per epoch ({minibatches} = samples per device / train.batch_size_per_device)")
        try:
            self.algorithm
        except ValueError as error:
            errors.append(f"method: {error}")
        else:
            errors += self.method.validate(s.settings())
            if self.eval.step_grad_norms and not ALGORITHMS[self.algorithm].trains_on_transitions:
                errors.append(f"eval.step_grad_norms: {self.algorithm} does not train on single denoising steps, so "
                              "it has no per-step gradient; the methods that do: " +
                              ", ".join(name for name, cls in ALGORITHMS.items() if cls.trains_on_transitions))
            if self.method.needs_differentiable_reward:
                errors += self.reward.differentiability_errors(self.algorithm)
        errors += self.reward.validate() + self.eval.validate()
        for check, label in [(lambda: prompts.check(self.prompts), "prompts"),
                             (lambda: resolve_model(self.model.name), "model.name")]:
            try:
                check()
            except ValueError as error:
                errors.append(f"{label}: {error}")
        scheduler = None if any(e.startswith("model.name") for e in errors) else scheduler_config(self.model.name)
        if scheduler is not None and s.num_inference_steps >= 1:
            try:
                schedule = Schedule.from_scheduler_config(scheduler)
            except Exception:  # a broken scheduler config: loading the model reports it
                schedule = None
            try:
                if schedule is not None:
                    schedule.timesteps(s.num_inference_steps)
            except ValueError as error:
                errors.append(f"sample.num_inference_steps ({s.num_inference_steps}) does not fit model "
                              f"{self.model.name!r}: {error}")
        return errors

    def check(self) -> Config:
        """Raises ValueError listing every problem (see :meth:`validate`); returns the config."""
        errors = self.validate()
        if errors:
            raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
        return self


def _path_errors(run_dir: str | None, resume: str | None) -> list[str]:
    """``run_dir`` must be a folder or creatable as one (no file in the way); ``resume`` must exist."""
    errors = []
    if run_dir is not None:
        try:
            if "\0" in run_dir:
                raise ValueError("it contains a NUL character")
            path = Path(run_dir)
            for folder in [path, *path.parents]:
                if folder.exists():
                    if not folder.is_dir():
                        errors.append(f"run_dir {run_dir!r}: {str(folder)!r} is a file, not a folder")
                    break
        except (OSError, ValueError) as error:
            errors.append(f"run_dir {run_dir!r} is not a usable folder path ({error})")
    if resume is not None:
        try:
            exists = "\0" not in resume and Path(resume).exists()
        except OSError:
            exists = False
        if not exists:
            errors.append(f"resume: {resume!r} does not exist (give a checkpoint folder or a run folder)")
    return errors


def _describe(hint, article: bool = True) -> str:
    """A type annotation in words, for error messages ("an int", "a tuple (or list) of str", "a number or None")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, article) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"{'a ' if article else ''}tuple (or list) of {_describe(args[0], False)}"
    if origin is dict:
        return f"{'a ' if article else ''}dict of {_describe(args[0], False)} to {_describe(args[1], False)}"
    if hint is type(None):
        return "None"
    if isinstance(hint, TypeVar):
        return _describe(hint.__bound__, article)
    if hint is float:
        return "a number" if article else "number"
    name = getattr(hint, "__name__", str(hint))
    return f"{'an' if name[0] in 'AEIOUaeiou' else 'a'} {name}" if article else name


def _has_type(value, hint) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (bool is not an int here; an int is a float; NaN is not a
    number). Annotations this does not know are not judged."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(_has_type(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(k, args[0]) and _has_type(v, args[1])
                                               for k, v in value.items())
    if isinstance(hint, TypeVar):
        return hint.__bound__ is None or isinstance(value, hint.__bound__)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def type_errors(config, prefix: str = "") -> list[str]:
    """An error for every field of the dataclass ``config`` (and of the dataclasses in it) whose value does not
    have the field's declared type, naming the field, the value and the type."""
    errors = []
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        name, value, hint = prefix + f.name, getattr(config, f.name), hints.get(f.name)
        if hint is None:
            continue
        if not _has_type(value, hint):
            errors.append(f"{name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            errors += type_errors(value, f"{name}.")
    return errors


def with_algorithm(config: Config, name: str) -> Config:
    """``config`` trained by method ``name``: its method settings become that method's defaults, unless it is
    already that method (everything else is kept)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    if config.algorithm == name:
        return config
    return dataclasses.replace(config, method=ALGORITHMS[name].config_class())


def _ddpo_reference(reward: str, prompts: str, **overrides) -> Config:
    """DDPO's 8-GPU reference experiments (ddpo-pytorch ``config/dgx.py``), per device, SD 1.5."""
    config = Config(
        preset="", reward=RewardConfig(name=reward), prompts=prompts, epochs=100, save_freq=1,
        model=ModelConfig(name="stable-diffusion-v1-5/stable-diffusion-v1-5", mixed_precision="fp16"),
        sample=SampleConfig(num_inference_steps=50, eta=1.0, guidance_scale=5.0, batch_size_per_device=8,
                            num_batches_per_epoch=4),
        train=TrainConfig(batch_size_per_device=4, gradient_accumulation_steps=2, learning_rate=3e-4),
    )
    return replace(config, **overrides)


def replace(config, **changes):
    """``dataclasses.replace`` that also takes dotted nested fields: replace(c, **{"sample.eta": 0.5})."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(flat.get(head, getattr(config, head)), **sub)
    return dataclasses.replace(config, **flat)


def _from_data(cls, data: dict, where: str = "config"):
    """The dataclass ``cls`` from JSON data: nested dataclasses by their annotations, JSON lists as tuples. Errors
    name the field (``where``, e.g. ``config.model``); value types are left to :meth:`Config.validate`."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object ({cls.__name__}), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{where}: {cls.__name__} has no field(s) {', '.join(sorted(map(str, unknown)))}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _from_data(hint, value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def config_from_dict(data: dict) -> Config:
    """The config a run folder's ``config.json`` holds (the inverse of :meth:`Config.to_dict`)."""
    if not isinstance(data, dict):
        raise ValueError(f"config: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("algorithm", None)
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise ValueError(f"config: algorithm {name!r} is not registered ({', '.join(ALGORITHMS)})")
    method = _from_data(ALGORITHMS[name].config_class, data.pop("method", {}), "config.method")
    return dataclasses.replace(_from_data(Config, data), method=method)


def _presets() -> dict[str, Config]:
    tiny = Config(
        reward=RewardConfig(name="jpeg_compressibility"), prompts="simple_animals", epochs=10, save_freq=1,
        model=ModelConfig(name="tiny", lora_rank=4, lora_alpha=4.0),
        sample=SampleConfig(num_inference_steps=10, guidance_scale=5.0, batch_size_per_device=4,
                            num_batches_per_epoch=2),
        train=TrainConfig(batch_size_per_device=4, gradient_accumulation_steps=1, learning_rate=1e-3),
        method=DDPOConfig(advantages=AdvantageConfig(min_count=4)),
    )
    # The ShapesWorld methods' common ground: each epoch draws 4 train captions × 8 samples, so every caption's
    # advantages are normalised within its own group; one optimizer step per epoch over half the steps.
    shapes = Config(
        reward=RewardConfig(name="shapes"), prompts="shapes", epochs=90, save_freq=30,
        eval=EvalConfig(prompts="shapes_heldout", samples=192, freq=30, diversity_prompts=8),
        model=ModelConfig(name="shapes", lora_rank=8, lora_alpha=8.0),
        sample=SampleConfig(num_inference_steps=20, guidance_scale=3.0, batch_size_per_device=32,
                            num_batches_per_epoch=1, samples_per_prompt=8),
        train=TrainConfig(batch_size_per_device=32, gradient_accumulation_steps=1, learning_rate=2e-3),
        method=DDPOConfig(timestep_fraction=0.5, advantages=AdvantageConfig(min_count=8)),
    )
    # The demo (`make demo`), about 8 min on 2 CPU cores: DDPO with 16 captions × 8 samples (two sampling batches of
    # 64) per optimizer step. On the shipped base this was the setting that beat its placebo (advantages permuted
    # within groups) and ended above the base; 32 samples per step at this learning rate drifted below the base
    # (README, "What the methods reach on ShapesWorld").
    ddpo_shapes = dataclasses.replace(
        shapes, epochs=60,
        sample=dataclasses.replace(shapes.sample, batch_size_per_device=64, num_batches_per_epoch=2),
        train=dataclasses.replace(shapes.train, batch_size_per_device=64, gradient_accumulation_steps=2))
    # Reward-filtered fine-tuning on ShapesWorld: each epoch 16 train captions × 8 samples; the (at most) 2 best
    # samples of each caption that meet every constraint are fine-tuned on, 4 steps of 32 per epoch.
    raft_shapes = dataclasses.replace(
        shapes, epochs=70, save_freq=35,
        eval=EvalConfig(prompts="shapes_heldout", samples=192, freq=35, diversity_prompts=8),
        sample=SampleConfig(num_inference_steps=20, guidance_scale=3.0, batch_size_per_device=64,
                            num_batches_per_epoch=2, samples_per_prompt=8),
        train=TrainConfig(batch_size_per_device=32, gradient_accumulation_steps=1, learning_rate=2e-4),
        method=RaftConfig(top_k=2, threshold=1.0, updates_per_epoch=4))
    # Reward backpropagation on ShapesWorld: the learned (differentiable) reward as proxy, the verifiable one as gold.
    draft_shapes = dataclasses.replace(
        shapes, epochs=100, save_freq=50, reward=RewardConfig(name="shapes_learned", gold="shapes"),
        eval=EvalConfig(prompts="shapes_heldout", samples=192, freq=50, diversity_prompts=8),
        sample=SampleConfig(num_inference_steps=20, guidance_scale=3.0, batch_size_per_device=32,
                            num_batches_per_epoch=1),
        train=TrainConfig(batch_size_per_device=8, gradient_accumulation_steps=4, learning_rate=3e-4),
        method=DraftConfig(truncation=2))
    # DAV on ShapesWorld: each epoch searches one trajectory for each of 16 train captions (4 children per step,
    # kept by importance weights), then fits the searched transitions of the noisier half of the steps.
    dav_shapes = dataclasses.replace(
        shapes, epochs=60, save_freq=30,
        eval=EvalConfig(prompts="shapes_heldout", samples=192, freq=30, diversity_prompts=8),
        sample=SampleConfig(num_inference_steps=20, guidance_scale=3.0, batch_size_per_device=16,
                            num_batches_per_epoch=1),
        train=TrainConfig(batch_size_per_device=16, gradient_accumulation_steps=1, learning_rate=1e-3),
        method=DavConfig(children=4, timestep_fraction=0.5))
    # DAG on ShapesWorld: the demo's sampling (4 captions × 8 samples); a quarter of each trajectory's transitions
    # trained per epoch (each costs two decodes and two reward calls); β reaches the reference's 100 at mid-run.
    dag_shapes = dataclasses.replace(
        shapes, epochs=60, save_freq=30, train=dataclasses.replace(shapes.train, learning_rate=3e-4),
        eval=EvalConfig(prompts="shapes_heldout", samples=192, freq=30, diversity_prompts=8),
        method=DagConfig(anneal_epochs=30, timestep_fraction=0.25, flow_channels=(32, 64, 64)))
    # SDPO on ShapesWorld with the demo's sample budget: 4 train captions × 4 pairs (32 trajectories) per epoch, each
    # caption's returns normalised per step within its own 8 trajectories; half the step positions trained, one
    # optimizer step per position. On the few-step base (shapes-turbo: trailing timesteps, no guidance, made on
    # first use), with 20-step trajectories whose first x̂0 is the 1-step sample, as the reference trains SD-Turbo.
    sdpo_shapes = dataclasses.replace(
        shapes, model=dataclasses.replace(shapes.model, name="shapes-turbo"),
        sample=SampleConfig(num_inference_steps=20, guidance_scale=1.0, batch_size_per_device=16,
                            num_batches_per_epoch=1, samples_per_prompt=4),
        train=TrainConfig(batch_size_per_device=16, gradient_accumulation_steps=1, learning_rate=3e-4),
        method=SDPOConfig(timestep_fraction=0.5, advantages=AdvantageConfig(buffer_size=8, min_count=8)))
    # SDPO's reference run on SD-Turbo (ZiyiZhang27/sdpo config_sdpo.py pickscore(), per device; a GPU run):
    # 50-step stochastic trajectories without guidance, on the trailing timesteps of SD-Turbo's own scheduler
    # config; PickScore loads from the hub (for the aesthetic head: --reward.name aesthetic --reward.kwargs head PATH).
    sdpo_sd_turbo = Config(
        reward=RewardConfig(name="pickscore"), prompts="simple_animals", epochs=200, save_freq=1,
        model=ModelConfig(name="stabilityai/sd-turbo", mixed_precision="fp16"),
        sample=SampleConfig(num_inference_steps=50, eta=1.0, guidance_scale=1.0, batch_size_per_device=8,
                            num_batches_per_epoch=4),
        train=TrainConfig(batch_size_per_device=1, gradient_accumulation_steps=16, learning_rate=6e-5),
        method=SDPOConfig())
    dag_tiny = dataclasses.replace(tiny, eval=dataclasses.replace(tiny.eval, diversity_prompts=2),
                                   method=DagConfig(anneal_epochs=5, flow_channels=(32, 64)))
    presets = {
        "ddpo-tiny": tiny,
        "ddpo-shapes": ddpo_shapes,
        "reinforce-tiny": dataclasses.replace(tiny, method=ReinforceConfig(advantages=AdvantageConfig(min_count=4))),
        # DDPO_SF on ShapesWorld: the demo's sampling, groups and schedule, with a small KL-to-base penalty.
        "reinforce-shapes": dataclasses.replace(shapes, method=ReinforceConfig(
            timestep_fraction=0.5, kl_coef=0.01, advantages=AdvantageConfig(min_count=8))),
        "raft-tiny": dataclasses.replace(tiny, method=RaftConfig(updates_per_epoch=2),
                                         sample=dataclasses.replace(tiny.sample, samples_per_prompt=4)),
        "raft-shapes": raft_shapes,
        "draft-tiny": dataclasses.replace(tiny, reward=RewardConfig(name="brightness"), method=DraftConfig()),
        "draft-shapes": draft_shapes,
        "dag-tiny": dag_tiny,
        "dag-kl-tiny": dataclasses.replace(dag_tiny, method=dataclasses.replace(dag_tiny.method, klpf=1.0)),
        "dag-shapes": dag_shapes,
        "dag-kl-shapes": dataclasses.replace(dag_shapes, method=dataclasses.replace(dag_shapes.method, klpf=1.0)),
        "dav-tiny": dataclasses.replace(tiny, method=DavConfig(children=2)),
        "dav-shapes": dav_shapes,
        "trpo-tiny": dataclasses.replace(tiny, method=TRPOConfig(cg_iters=5, fisher_fraction=0.5,
                                                                advantages=AdvantageConfig(min_count=4))),
        # TRPO on ShapesWorld: the demo's sampling and groups; one natural-gradient step per epoch over half the
        # steps, its curvature from half of their transitions.
        "trpo-shapes": dataclasses.replace(shapes, method=TRPOConfig(
            fisher_fraction=0.5, timestep_fraction=0.5, advantages=AdvantageConfig(min_count=8))),
        "actor-critic-tiny": dataclasses.replace(tiny, method=ActorCriticConfig(
            advantages=AdvantageConfig(min_count=4))),
        # The actor-critic on ShapesWorld: the demo's sampling, groups and schedule, per-step advantages from the
        # value network and a small KL to the base model.
        "actor-critic-shapes": dataclasses.replace(shapes, method=ActorCriticConfig(
            kl_coef=0.01, timestep_fraction=0.5, advantages=AdvantageConfig(min_count=8))),
        # SDPO on the tiny model: 4 steps without guidance; 2 prompts per sampling batch, i.e. 4 trajectories.
        "sdpo-tiny": dataclasses.replace(
            tiny, sample=SampleConfig(num_inference_steps=4, guidance_scale=1.0, batch_size_per_device=2,
                                      num_batches_per_epoch=2),
            train=TrainConfig(batch_size_per_device=2, gradient_accumulation_steps=1, learning_rate=1e-3),
            method=SDPOConfig(advantages=AdvantageConfig(buffer_size=32, min_count=4))),
        "sdpo-shapes": sdpo_shapes,
        "sdpo-sd-turbo": sdpo_sd_turbo,
        # DRaFT-1 with the LAION aesthetic head on SD 1.5 (a GPU run; pass the CLIP and head paths as reward.kwargs)
        "draft-sd15-aesthetic": _ddpo_reference(
            "aesthetic", "simple_animals", epochs=100, method=DraftConfig(truncation=1),
            **{"sample.eta": 0.0, "train.learning_rate": 1e-4, "train.batch_size_per_device": 2,
               "train.gradient_accumulation_steps": 4}),
        "ddpo-sd15-compressibility": _ddpo_reference("jpeg_compressibility", "imagenet_animals"),
        "ddpo-sd15-incompressibility": _ddpo_reference("jpeg_incompressibility", "imagenet_animals"),
        "ddpo-sd15-aesthetic": _ddpo_reference(
            "aesthetic", "simple_animals", epochs=200, **{"train.gradient_accumulation_steps": 4,
                                                          "method.advantages.buffer_size": 32}),
    }
    return {name: dataclasses.replace(config, preset=name) for name, config in presets.items()}


PRESETS: dict[str, Config] = _presets()


def preset(name: str) -> Config:
    """A fresh copy of the preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
