"""A few-step ShapesWorld model by knowledge distillation: ``diffalign pretrain shapes-turbo``.

Knowledge distillation of an iterative sampler (Luhman & Luhman 2021, "Knowledge Distillation in Iterative
Generative Models for Improved Sampling Speed", arXiv:2101.02388): the teacher's deterministic DDIM sampler
(η = 0) maps each x_T to an x_0, and a student initialised from the teacher learns that map by regression.
Here the teacher is the shipped ``shapes`` base with classifier-free guidance (w = 3), run for
``teacher_steps`` = 40 "trailing" steps (t = 999, 974, …, 24). Its trajectory passes through every trailing
timestep of N = 1, 2, 4 and 8 steps (999; 999, 499; 999, 749, 499, 249; 999, 874, …, 124), so each trajectory
gives the student one training pair per such timestep: (x_t on the teacher's trajectory, t, caption) → the
teacher's final x̂_0, by MSE on the latents. The UNet predicts x_0 (``"sample"``), so its output *is* x̂_0 (other
prediction types are converted by the DDIM step's own formula, :func:`diffalign.rollout.denoise_step`).

Where this differs from the paper, and why:

- *Multi-step.* The paper trains a one-step student on x_T only. Training at the trailing timesteps of every
  N in ``student_steps`` makes the student usable with N-step DDIM at each of them: step k of an N-step sample
  starts from (approximately) the teacher trajectory's x_t at the same t.
- *Guidance distilled in.* The teacher runs with CFG; the student is trained and sampled with its conditional
  branch only (guidance 1, one UNet pass per step), as SD-Turbo is used. No negative prompt.
- *Loss.* MSE on the VAE latents rather than on images (32×32 flat-colour scenes; the latent is what the UNet
  predicts). Pairs are drawn uniformly over (N, step of N), so t = 999, used by every N, is drawn most.

The student's whole UNet is fine-tuned (text encoder and VAE frozen and shared with the base), and an
exponential moving average of its weights (:class:`~diffalign.train.pretrain_shapes.EMA`, as in pretraining) is
what gets saved. The output is a plain Stable-Diffusion pipeline folder: the base's VAE, text encoder and
tokenizer copied, the student UNet, the base's scheduler config with ``timestep_spacing="trailing"``, plus
``eval.json`` (strict accuracy of the verifiable reward per step count) and ``README.md``. It is written to
``<output_dir>.partial`` and moved into place only when complete.

Reproducibility: teacher seeds, captions, pair draws and batches come from ``(seed, step, stream)``
(:func:`diffalign.rollout.derive_seed`): the same seed and thread count give identical weights (CPU, fp32).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from diffalign import prompts as prompt_sources
from diffalign.models.loading import cached_model_path, load_policy, missing_pipeline_files, resolve_model
from diffalign.models.policy import Policy, Schedule
from diffalign.models.shapes import base_model_path
from diffalign.rollout import Conditioning, StepSettings, denoise_step, derive_seed, sample
from diffalign.train.pretrain_shapes import EMA, evaluate_base_model, model_summary, optimize

#: Random streams (the 4th component of derive_seed) of this recipe.
TEACHER_SEEDS, TEACHER_PROMPTS, PAIR_STREAM = 11, 12, 13
#: The name this recipe's output has among the built-in models (its default folder is that model's cache).
MODEL_NAME = "shapes-turbo"


@dataclass
class DistillConfig:
    """How ``diffalign pretrain shapes-turbo`` distils the ShapesWorld base into a few-step student (defaults:
    the cached ``shapes-turbo`` model, about 5 min on 2 CPU cores)."""

    output_dir: str | None = None
    """Folder the pipeline, eval.json and README.md are written to (default: the shapes-turbo cache folder)."""
    teacher: str = "shapes"
    """The teacher (and the student's initial weights): 'shapes' or a local Stable-Diffusion pipeline folder."""
    prompts: str = "shapes"
    """Prompt source of the teacher's captions (diffalign.prompts; 'shapes' is the ShapesWorld train split)."""
    seed: int = 0
    """Seed of the teacher's x_T and captions and of every training draw."""
    num_threads: int = 2
    """torch CPU threads (the weights are bit-reproducible for a fixed seed and thread count)."""
    teacher_steps: int = 40
    """DDIM steps (trailing, η = 0) of the teacher's trajectories; must contain the timesteps of student_steps."""
    teacher_guidance_scale: float = 3.0
    """Classifier-free guidance scale of the teacher (the student runs without guidance)."""
    student_steps: tuple[int, ...] = (1, 2, 4, 8)
    """Step counts the student is trained for (and evaluated at): their trailing timesteps are the training t."""
    num_trajectories: int = 1536
    """Teacher trajectories (one caption and x_T each) in the distillation set."""
    teacher_batch_size: int = 128
    """Trajectories per teacher sampling batch."""
    train_steps: int = 1200
    """Optimizer steps of the student."""
    batch_size: int = 64
    """(x_t, t, caption, x_0) pairs per optimizer step."""
    learning_rate: float = 5e-4
    """Peak AdamW learning rate of the student UNet (linear warm-up, cosine decay)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps (capped at a tenth of train_steps)."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average of the student's weights that is saved (~200-step window)."""
    eval_samples_per_family: int = 100
    """Captions per family and split in the final evaluation (eval.json); 0 skips it."""
    eval_teacher: bool = True
    """Also evaluate the teacher (teacher_steps trailing steps with guidance) on the same captions."""

    def validate(self) -> list[str]:
        """Every problem with this config, each naming the field, the value and what is allowed."""
        errors = []
        for name in ("num_threads", "teacher_steps", "num_trajectories", "teacher_batch_size", "train_steps",
                     "batch_size"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_samples_per_family"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            errors.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            errors.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.teacher_guidance_scale < 1:
            errors.append(f"teacher_guidance_scale must be >= 1, got {self.teacher_guidance_scale}")
        if not self.student_steps or min(self.student_steps) < 1:
            errors.append(f"student_steps must be step counts >= 1, got {self.student_steps}")
        elif self.teacher_steps >= 1:
            outside = [n for n in self.student_steps if self.teacher_steps % n]
            if outside:
                errors.append(f"student_steps {outside} do not divide teacher_steps {self.teacher_steps}: their "
                              "trailing timesteps are not on the teacher's trajectory (use divisors: 1,2,4,8 of 40)")
        if self.teacher != "shapes" and not (Path(self.teacher).expanduser() / "unet").is_dir():
            errors.append(f"teacher must be 'shapes' or a local pipeline folder, got {self.teacher!r}")
        try:
            prompt_sources.check(self.prompts)
        except ValueError as error:
            errors.append(f"prompts: {error}")
        return errors

    def check(self) -> DistillConfig:
        """Raises ValueError listing every problem (see :meth:`validate`); returns the config."""
        errors = self.validate()
        if errors:
            raise ValueError("invalid distill config:\n  - " + "\n  - ".join(errors))
        return self

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else cached_model_path(MODEL_NAME)


# ------------------------------------------------------------------------------------------------ timesteps


def trailing_policy(policy: Policy) -> Policy:
    """``policy`` with "trailing" timestep spacing (the same modules; only the schedule's layout changes)."""
    policy.schedule = dataclasses.replace(policy.schedule, timestep_spacing="trailing")
    return policy


def training_pairs(schedule: Schedule, teacher_steps: int, student_steps: tuple[int, ...]) -> torch.Tensor:
    """The (N, step) pairs the student is trained on, as positions in the teacher's trajectory ``[P]`` (long):
    for every N in ``student_steps`` and every step of N, the index of its timestep among the teacher's."""
    teacher = schedule.timesteps(teacher_steps).tolist()
    positions = []
    for n in student_steps:
        for t in schedule.timesteps(n).tolist():
            if t not in teacher:
                raise ValueError(f"timestep {t} of {n} trailing steps is not among the {teacher_steps} teacher steps")
            positions.append(teacher.index(t))
    return torch.tensor(positions)


# ------------------------------------------------------------------------------------------------- teacher


@dataclass(frozen=True)
class TeacherData:
    """The distillation set of M teacher trajectories at the P' distinct training timesteps.

    ``x_t`` ``[M, P', C, h, w]`` (the trajectory's latent *entering* each timestep), ``timesteps`` ``[P']``,
    ``x0`` ``[M, C, h, w]`` (the teacher's final x̂_0), ``prompt_embeds`` ``[M, L, D]``, ``prompts`` (M).
    """

    x_t: torch.Tensor
    timesteps: torch.Tensor
    x0: torch.Tensor
    prompt_embeds: torch.Tensor
    prompts: list[str]


@torch.no_grad()
def teacher_trajectories(config: DistillConfig, teacher: Policy, positions: torch.Tensor) -> TeacherData:
    """Samples the teacher (``teacher_steps`` trailing DDIM steps, η = 0, guidance) from seeded x_T on captions
    drawn from ``config.prompts``; keeps x_t at the trajectory ``positions`` and the final x̂_0."""
    source = prompt_sources.get(config.prompts)
    settings = StepSettings(config.teacher_steps, config.teacher_guidance_scale, eta=0.0)
    keep = torch.unique(positions)
    parts = []
    batches = range(0, config.num_trajectories, config.teacher_batch_size)
    for batch, start in enumerate(tqdm(batches, desc="distill shapes-turbo: teacher trajectories", mininterval=2.0)):
        n = min(config.teacher_batch_size, config.num_trajectories - start)
        prompts = source.draw(n, torch.Generator().manual_seed(derive_seed(config.seed, batch, 0, TEACHER_PROMPTS)))
        seeds = [derive_seed(config.seed, batch, i, TEACHER_SEEDS) for i in range(n)]
        rollout = sample(teacher, prompts, seeds, settings, record_x0_preds=True)
        parts.append((rollout.latents[:, keep], rollout.x0_preds[:, -1], rollout.prompt_embeds, prompts))
    return TeacherData(
        x_t=torch.cat([p[0] for p in parts]), timesteps=teacher.schedule.timesteps(config.teacher_steps)[keep],
        x0=torch.cat([p[1] for p in parts]), prompt_embeds=torch.cat([p[2] for p in parts]),
        prompts=[prompt for p in parts for prompt in p[3]],
    )


# ------------------------------------------------------------------------------------------------- student


def student_x0(student: Policy, x_t: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """The student's x̂_0 ``[B, C, h, w]`` at x_t, per-sample t ``[B]``, without guidance (differentiable)."""
    settings = StepSettings(num_inference_steps=1, guidance_scale=1.0, eta=0.0)
    return denoise_step(student, x_t, t, Conditioning(prompt_embeds), settings, with_log_prob=False).x0_pred


def distillation_loss(config: DistillConfig, step: int, student: Policy, data: TeacherData,
                      positions: torch.Tensor) -> torch.Tensor:
    """MSE between the student's x̂_0 and the teacher's x_0 on batch ``step``: trajectories uniform over the
    set, (N, step of N) pairs uniform over ``positions`` (so t = 999, shared by every N, is drawn most)."""
    generator = torch.Generator().manual_seed(derive_seed(config.seed, step, 0, PAIR_STREAM))
    rows = torch.randint(len(data.x0), (config.batch_size,), generator=generator)
    pair = positions[torch.randint(len(positions), (config.batch_size,), generator=generator)]
    column = torch.searchsorted(torch.unique(positions), pair)  # position → column of data.x_t
    t = data.timesteps[column]
    x0_pred = student_x0(student, data.x_t[rows, column], t, data.prompt_embeds[rows])
    return F.mse_loss(x0_pred, data.x0[rows])


def train_student(config: DistillConfig, student: Policy, data: TeacherData, positions: torch.Tensor) -> EMA:
    """Fine-tunes the student's whole UNet on the distillation set; returns the EMA of its weights."""
    student.unet.train()
    ema = optimize(list(student.unet.parameters()),
                   lambda step: distillation_loss(config, step, student, data, positions), config.train_steps,
                   config.learning_rate, config.warmup_steps, config.ema_decay, "distill shapes-turbo: student")
    student.unet.eval()
    return ema


# ------------------------------------------------------------------------------------------- output folder


def teacher_folder(teacher: str) -> Path:
    """The pipeline folder of the teacher named in the config."""
    return base_model_path() if teacher == "shapes" else Path(resolve_model(str(Path(teacher).expanduser())))


def save_student(student: Policy, teacher_dir: Path, directory: Path) -> Path:
    """Writes the pipeline folder: the teacher's model_index.json, VAE, text encoder and tokenizer copied, the
    student UNet, and the teacher's scheduler config with trailing spacing."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(teacher_dir / "model_index.json", directory / "model_index.json")
    for component in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(teacher_dir / component, directory / component, dirs_exist_ok=True)
    student.base_unet.save_pretrained(directory / "unet", safe_serialization=True)
    scheduler = DDIMScheduler.from_pretrained(teacher_dir, subfolder="scheduler")
    DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing").save_pretrained(directory / "scheduler")
    for path in directory.rglob("*"):  # safetensors files are written owner-only (0600); make them readable
        if path.is_file():
            path.chmod(0o644)
    return directory


def _replace_folder(partial: Path, output: Path) -> None:
    """Moves the finished ``partial`` folder to ``output``, replacing an earlier pipeline folder there."""
    if output.exists():
        if (output / "model_index.json").is_file() or not any(output.iterdir()):
            shutil.rmtree(output)
        else:
            raise ValueError(f"output_dir {str(output)!r} exists and is not a pipeline folder; not overwriting it")
    partial.rename(output)


def evaluate_student(config: DistillConfig, student: Policy, teacher: Policy) -> dict:
    """Strict accuracy per step count (student, no guidance, η = 0) and of the teacher, on the fixed captions of
    :func:`~diffalign.train.pretrain_shapes.evaluate_base_model`."""
    n = config.eval_samples_per_family
    results = {"student": {str(steps): evaluate_base_model(student, config.seed, n, 1.0, steps)
                           for steps in tqdm(config.student_steps, desc="distill shapes-turbo: evaluation")}}
    if config.eval_teacher:
        results["teacher"] = {str(config.teacher_steps): evaluate_base_model(
            teacher, config.seed, n, config.teacher_guidance_scale, config.teacher_steps)}
    return results


def distill_command(config: DistillConfig) -> str:
    """The ``diffalign pretrain shapes-turbo`` command line that reproduces ``config`` (non-default fields
    only; ``--output-dir`` left out)."""
    default = DistillConfig()
    flags = [f"--{name.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"
             for name, value in asdict(config).items() if value != getattr(default, name) and name != "output_dir"]
    return " ".join(["diffalign pretrain shapes-turbo", *flags])


def distill(config: DistillConfig) -> Path:
    """Distils the teacher into the few-step student (module docstring), writes the pipeline folder with
    eval.json and README.md to ``config.output_path`` (via a ``.partial`` folder); returns its path."""
    config.check()
    output = config.output_path
    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        start = time.perf_counter()
        source = teacher_folder(config.teacher)
        teacher = trailing_policy(load_policy(str(source)))
        student = Policy(copy.deepcopy(teacher.unet).requires_grad_(True), teacher.vae, teacher.text_encoder,
                         teacher.tokenizer, teacher.schedule)
        positions = training_pairs(teacher.schedule, config.teacher_steps, config.student_steps)
        data = teacher_trajectories(config, teacher, positions)
        teacher_seconds = time.perf_counter() - start
        ema = train_student(config, student, data, positions)
        train_seconds = time.perf_counter() - start - teacher_seconds
        with ema.applied():
            save_student(student, source, partial)
        assert not missing_pipeline_files(partial), missing_pipeline_files(partial)
        written = load_policy(str(partial))  # evaluate what was written, as users will load it
        with torch.no_grad():  # the saved (EMA) student's loss on a fresh batch
            final_loss = distillation_loss(config, config.train_steps, written, data, positions).item()
        accuracy = evaluate_student(config, written, teacher) if config.eval_samples_per_family else {}
        report = {
            "command": distill_command(config),
            "model": model_summary(written),
            "config": {k: v for k, v in asdict(config).items() if k != "output_dir"},
            "timesteps": {str(n): written.schedule.timesteps(n).tolist() for n in config.student_steps},
            "evaluation": {"student_guidance_scale": 1.0, "eta": 0.0,
                           "samples_per_family": config.eval_samples_per_family},
            "accuracy": accuracy,
            "final_loss": round(final_loss, 5),
            "wall_time_s": {"teacher": round(teacher_seconds), "student": round(train_seconds),
                            "total": round(time.perf_counter() - start)},
            "environment": {"torch": torch.__version__, "num_threads": config.num_threads,
                            "machine": platform.machine()},
        }
        (partial / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (partial / "README.md").write_text(readme(report))
        _replace_folder(partial, output)
        return output
    finally:
        torch.set_num_threads(previous_threads)


def build_cached(path: Path) -> Path:
    """Makes the ``shapes-turbo`` cache folder ``path`` with the default recipe (the builder that
    :func:`diffalign.models.loading.register_builder` is given)."""
    print(f"diffalign: {MODEL_NAME} is not cached yet: distilling it from the shapes base into {path} "
          "(once; about 5 min on 2 CPU cores)", flush=True)
    return distill(DistillConfig(output_dir=str(path)))


def _accuracy_rows(accuracy: dict) -> list[str]:
    rows = []
    for model, by_steps in accuracy.items():
        for steps, splits in by_steps.items():
            strict = {split: sum(r["strict"] * r["n"] for r in fams.values()) / sum(r["n"] for r in fams.values())
                      for split, fams in splits.items()}
            rows.append(f"| {model} | {steps} | {strict.get('train', float('nan')):.3f} | "
                        f"{strict.get('heldout', float('nan')):.3f} |")
    return rows


def readme(report: dict) -> str:
    """The model card of the pipeline folder, from the :func:`distill` report (``eval.json``)."""
    config, wall = report["config"], report["wall_time_s"]
    timesteps = "; ".join(f"N = {n}: {', '.join(map(str, ts))}" for n, ts in report["timesteps"].items())
    return f"""# shapes-turbo: a few-step ShapesWorld model (`diffalign.train.distill_shapes`)

The ShapesWorld base (`shapes`) distilled into a student that samples in 1–8 DDIM steps **without
classifier-free guidance** (guidance scale 1), with "trailing" timesteps ({timesteps}). Load it with
`diffalign.models.load_policy("shapes-turbo")` (made in the cache on first use) or, offline, with plain
diffusers `StableDiffusionPipeline.from_pretrained(<this folder>)`. VAE, text encoder and tokenizer are the base's.

## How it was made

    {report["command"]}

Knowledge distillation (Luhman & Luhman 2021), multi-step: {config["num_trajectories"]} teacher trajectories
(the base, {config["teacher_steps"]} trailing DDIM steps, η = 0, guidance {config["teacher_guidance_scale"]}, captions
from `{config["prompts"]}`); the student UNet (initialised from the base, whole UNet trained, EMA
{config["ema_decay"]}) regresses the teacher's final x̂_0 from the trajectory's x_t at the trailing timesteps of
N = {", ".join(map(str, config["student_steps"]))} steps: {config["train_steps"]} steps × {config["batch_size"]}, peak
learning rate {config["learning_rate"]}; final loss {report["final_loss"]}. Seed {config["seed"]},
{config["num_threads"]} CPU threads; wall time {wall["total"] / 60:.1f} min (teacher {wall["teacher"]} s, student
{wall["student"]} s, the rest evaluation); torch {report["environment"]["torch"]}.

## Evaluation (`eval.json`)

Strict accuracy of the verifiable reward (`diffalign.rewards.shapes`), η = 0, {config["eval_samples_per_family"]}
fixed captions per family and split (those of the base's own `eval.json`); the student without guidance, the
teacher with it.

| model | steps | train strict | held-out strict |
|---|---|---|---|
{chr(10).join(_accuracy_rows(report["accuracy"]))}
"""
