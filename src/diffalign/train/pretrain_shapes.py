"""Pretraining the ShapesWorld base model from a seed, on the CPU: ``diffalign pretrain shapes``.

Two stages, on (caption, scene) pairs of the grammar's TRAIN split rendered on the fly (batch ``k`` of a stage
is a pure function of ``(seed, k)``, see :func:`_examples`):

1. **VAE.** AutoencoderKL (:data:`~diffalign.models.shapes.VAE_CONFIG`) with an L1 + L2 reconstruction loss and a
   small KL weight (LDM's recipe, without the perceptual and adversarial terms, which 32×32 flat-colour scenes
   do not need). Its ``scaling_factor`` is then set to 1 / std of the latents (SD's 0.18215 was found the same
   way) and the deterministic detector is run on reconstructions of held-out scenes: the latents must keep
   every colour, shape, size and position readable.
2. **UNet + text encoder**, trained jointly from scratch on the frozen VAE's latents with the standard
   denoising loss for ``prediction_type`` (ε, ``"epsilon"``, for the shipped model; ``--prediction-type
   sample`` or ``v_prediction`` train the same network to predict x0 or v), t uniform over the 1000 training
   steps, and each caption replaced by ``""`` with probability ``caption_dropout`` so the model also learns the
   unconditional score that classifier-free guidance needs (Ho & Salimans 2022).
   An exponential moving average of the weights (as in DDPM) is what gets saved.

The output folder is a plain Stable-Diffusion pipeline (``StableDiffusionPipeline.from_pretrained``), with
``samples/`` grids written along the way, ``eval.json`` (the verifiable reward per caption family for train
and held-out captions at 20 DDIM steps) and a ``README.md`` describing the run.

Reproducibility: every random draw comes from a generator seeded from ``(seed, step, stream)``
(:func:`diffalign.rollout.derive_seed`), so on the CPU in fp32 the same seed and thread count give identical
weights. (A different thread count may change float summation order in the convolutions, hence the last bits.)
"""

from __future__ import annotations

import copy
import json
import math
import platform
import random
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffalign.evaluate.plots import image_grid
from diffalign.models import shapes as shapes_model
from diffalign.models.loading import load_policy
from diffalign.models.policy import Policy, Schedule
from diffalign.rewards.shapes import ShapesReward
from diffalign.rollout import StepSettings, derive_seed, sample
from diffalign.samplers import diffusion_target, q_sample
from diffalign.samplers.ddim import PredictionType
from diffalign.world.captions import FAMILIES, Caption, sample_caption_spec, scene_for_caption
from diffalign.world.render import render_batch

# Random streams (the 4th component of derive_seed), one per independent use.
VAE_DATA, VAE_NOISE, UNET_DATA, UNET_NOISE, EVAL_STREAM, LATENT_STREAM, VAE_CHECK_STREAM, SAMPLES_STREAM = range(1, 9)
EVAL_STEPS = 20
PREDICTION_TYPES = typing.get_args(PredictionType)


@dataclass
class PretrainConfig:
    """How ``diffalign pretrain shapes`` trains the ShapesWorld base model (defaults: the shipped model)."""

    output_dir: str = str(shapes_model.BASE_MODEL_DIR)
    """Folder the pipeline, samples/, eval.json and README.md are written to (default: the shipped folder)."""
    seed: int = 0
    """Seed of the initial weights and of every batch, noise and dropout draw."""
    prediction_type: PredictionType = shapes_model.SCHEDULER_CONFIG["prediction_type"]
    """What the UNet learns to predict: "epsilon" (the noise, as SD 1.x; the shipped model), "sample" (x0; the first
    shipped model, far weaker at this budget) or "v_prediction" (as SD 2.x); written into the scheduler config."""
    num_threads: int = 2
    """torch CPU threads (the weights are bit-reproducible for a fixed seed and thread count)."""
    vae_steps: int = 1500
    """Optimizer steps of stage 1 (the VAE)."""
    vae_batch_size: int = 32
    """Scenes per VAE step."""
    vae_learning_rate: float = 2e-3
    """Peak AdamW learning rate of the VAE (one-cycle: linear warm-up, cosine decay)."""
    vae_kl_weight: float = 1e-6
    """Weight of the per-image KL(q(z|x) ‖ N(0, I)) against the per-pixel L1 + L2 reconstruction loss."""
    unet_steps: int = 4000
    """Optimizer steps of stage 2 (the UNet and text encoder)."""
    unet_batch_size: int = 64
    """(caption, scene) pairs per stage-2 step."""
    unet_learning_rate: float = 2e-3
    """Peak AdamW learning rate of the UNet and the text encoder (linear warm-up, cosine decay)."""
    warmup_steps: int = 200
    """Linear learning-rate warm-up steps (each stage; capped at a tenth of the stage)."""
    caption_dropout: float = 0.1
    """Probability that a training caption is replaced by "" (for classifier-free guidance)."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the UNet and text-encoder weights that is saved."""
    sample_every: int = 1000
    """Write a grid of samples to <output_dir>/samples/ every this many stage-2 steps (0: only at the end)."""
    eval_samples_per_family: int = 100
    """Captions per family and split in the final evaluation (eval.json); 0 skips it."""
    eval_guidance_scale: float = 3.0
    """Classifier-free guidance scale of the final evaluation and the sample grids."""
    vae_check_samples: int = 256
    """Scenes per split (at least 64) whose VAE reconstructions the detector must read (in eval.json); the
    train ones also set the latent scaling factor."""

    def validate(self) -> list[str]:
        """Every problem with this config, each naming the field, the value and what is allowed."""
        errors = []
        for name in ("num_threads", "vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "eval_samples_per_family", "vae_check_samples"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("vae_learning_rate", "unet_learning_rate"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.vae_kl_weight < 0:
            errors.append(f"vae_kl_weight must be >= 0, got {self.vae_kl_weight}")
        if not 0 <= self.caption_dropout < 1:
            errors.append(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            errors.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.prediction_type not in PREDICTION_TYPES:
            errors.append(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}")
        if self.eval_guidance_scale < 1:
            errors.append(f"eval_guidance_scale must be >= 1, got {self.eval_guidance_scale}")
        return errors

    def check(self) -> PretrainConfig:
        """Raises ValueError listing every problem (see :meth:`validate`); returns the config."""
        errors = self.validate()
        if errors:
            raise ValueError("invalid pretrain config:\n  - " + "\n  - ".join(errors))
        return self


# ---------------------------------------------------------------------------------------------------- data


def _generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, step, 0, stream))


def _examples(seed: int, step: int, stream: int, n: int, split: str = "train") -> tuple[list[str], torch.Tensor]:
    """``n`` (caption, scene) pairs of ``split`` for batch ``step`` of ``stream``: captions and images
    ``[n, 3, 32, 32]`` in [0, 1], a pure function of the arguments."""
    rng = random.Random(derive_seed(seed, step, 0, stream))
    specs = [sample_caption_spec(rng, split) for _ in range(n)]
    scenes = [scene_for_caption(spec, rng) for spec in specs]
    return [spec.text for spec in specs], render_batch(scenes)


def _lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up to 1, then cosine decay to 0.05 (multiplier of the peak learning rate)."""
    warmup = max(1, min(warmup_steps, total_steps // 10))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


# ----------------------------------------------------------------------------------------------- stage 1


def train_vae(config: PretrainConfig, vae) -> float:
    """Stage 1: trains ``vae`` in place on rendered train-split scenes; returns the last reconstruction loss."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.vae_steps, config.warmup_steps))
    vae.train()
    progress = tqdm(range(config.vae_steps), desc="pretrain shapes: VAE", mininterval=2.0)
    recon = float("nan")
    for step in progress:
        _, images = _examples(config.seed, step, VAE_DATA, config.vae_batch_size)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(_generator(config.seed, step, VAE_NOISE))
        x_rec = vae.decode(z).sample
        recon_loss = (x_rec - x).abs().mean() + (x_rec - x).pow(2).mean()
        kl = posterior.kl().mean()  # per image, summed over the latent's dimensions
        loss = recon_loss + config.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recon = recon_loss.item()
        progress.set_postfix(recon=f"{recon:.4f}", kl=f"{kl.item():.1f}", refresh=False)
    vae.eval()
    return recon


@torch.no_grad()
def latent_std(vae, images: torch.Tensor, generator: torch.Generator) -> float:
    """Std of the (unscaled) posterior samples of ``images`` ``[B, 3, 32, 32]``: ``scaling_factor`` is its
    inverse, so that the diffusion model sees unit-variance latents (how SD's 0.18215 was chosen)."""
    latents = [vae.encode(images[i : i + 64] * 2 - 1).latent_dist.sample(generator) for i in range(0, len(images), 64)]
    return torch.cat(latents).std().item()


@torch.no_grad()
def vae_reconstruction_accuracy(vae, captions: Sequence[str], images: torch.Tensor) -> dict[str, float]:
    """The verifiable reward on VAE reconstructions (posterior means) of ``images`` ``[B, 3, 32, 32]`` in [0, 1]:
    ``{"strict": accuracy, "score": mean score}`` (the detector reads the original renders perfectly)."""
    reconstructions = []
    for i in range(0, len(images), 64):
        x = images[i : i + 64] * 2 - 1
        reconstructions.append((vae.decode(vae.encode(x).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1))
    score, strict = ShapesReward().evaluate(torch.cat(reconstructions), list(captions))
    return {"strict": strict.float().mean().item(), "score": score.mean().item()}


# ----------------------------------------------------------------------------------------------- stage 2


class EMA:
    """Exponential moving average of some parameters, with DDPM-style warm-up: decay min(d, (1+k)/(10+k))."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float):
        self.parameters = list(parameters)
        self.shadow = [p.detach().clone() for p in self.parameters]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for shadow, param in zip(self.shadow, self.parameters):
            shadow.lerp_(param.detach(), 1 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the averaged values; restored afterwards."""
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for param, shadow in zip(self.parameters, self.shadow):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.parameters, saved):
                    param.copy_(value)


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids ``[B, L]`` padded to the tokenizer's max length, as the pipeline tokenizes."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def diffusion_loss(config: PretrainConfig, step: int, pipeline, schedule: Schedule) -> torch.Tensor:
    """The denoising loss of stage-2 batch ``step`` (captions dropped to "" with ``caption_dropout``)."""
    captions, images = _examples(config.seed, step, UNET_DATA, config.unet_batch_size)
    generator = _generator(config.seed, step, UNET_NOISE)
    n = len(captions)
    drop = torch.rand(n, generator=generator) < config.caption_dropout
    captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
    with torch.no_grad():
        posterior = pipeline.vae.encode(images * 2 - 1).latent_dist
        x0 = posterior.sample(generator) * pipeline.vae.config.scaling_factor
    t = torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = q_sample(x0, noise, t, schedule.alphas_cumprod)
    prompt_embeds = pipeline.text_encoder(tokenize(pipeline.tokenizer, captions))[0]
    output = pipeline.unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
    return F.mse_loss(output, diffusion_target(x0, noise, t, schedule.alphas_cumprod, schedule.prediction_type))


def optimize(trained: Sequence[torch.nn.Parameter], loss_of_step: Callable[[int], torch.Tensor], steps: int,
             learning_rate: float, warmup_steps: int, ema_decay: float, desc: str,
             after_step: Callable[[int, EMA], None] | None = None) -> EMA:
    """``steps`` AdamW steps on ``trained`` (no weight decay; :func:`_lr_lambda` schedule; gradients clipped to norm
    1) with ``loss_of_step(k)`` the loss of batch k; returns the EMA of the weights. ``after_step(k, ema)`` runs
    after each step (sample grids)."""
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, warmup_steps))
    ema = EMA(trained, ema_decay)
    progress = tqdm(range(steps), desc=desc, mininterval=2.0)
    running = None
    for step in progress:
        loss = loss_of_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        ema.update(step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        progress.set_postfix(loss=f"{running:.4f}", refresh=False)
        if after_step is not None:
            after_step(step, ema)
    return ema


def train_diffusion(config: PretrainConfig, pipeline, output_dir: Path) -> EMA:
    """Stage 2: trains the UNet and text encoder jointly; returns the EMA of their weights."""
    schedule = Schedule.from_scheduler_config(pipeline.scheduler.config)
    trained = [*pipeline.unet.parameters(), *pipeline.text_encoder.parameters()]
    pipeline.vae.requires_grad_(False)
    pipeline.unet.train()
    pipeline.text_encoder.train()

    def write_grid(step: int, ema: EMA) -> None:
        if config.sample_every and (step + 1) % config.sample_every == 0 and step + 1 < config.unet_steps:
            with ema.applied():
                write_samples(config, _frozen_policy(pipeline), output_dir / "samples" / f"step_{step + 1:06d}.png")

    # No weight decay: only the ~30 caption words' rows of the 49,408-row token embedding ever get a gradient.
    return optimize(trained, lambda step: diffusion_loss(config, step, pipeline, schedule), config.unet_steps,
                    config.unet_learning_rate, config.warmup_steps, config.ema_decay,
                    "pretrain shapes: UNet + text encoder", write_grid)


# ------------------------------------------------------------------------------------------- evaluation


def _frozen_policy(pipeline) -> Policy:
    """A Policy over copies of the pipeline's UNet and text encoder (Policy freezes what it is given)."""
    return Policy(copy.deepcopy(pipeline.unet).eval(), pipeline.vae, copy.deepcopy(pipeline.text_encoder).eval(),
                  pipeline.tokenizer, Schedule.from_scheduler_config(pipeline.scheduler.config))


def _sample_batched(policy: Policy, prompts: Sequence[str], seeds: Sequence[int], guidance_scale: float,
                    batch_size: int = 64, num_inference_steps: int = EVAL_STEPS) -> torch.Tensor:
    settings = StepSettings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=0.0)
    parts = [sample(policy, prompts[i : i + batch_size], seeds[i : i + batch_size], settings).images
             for i in range(0, len(prompts), batch_size)]
    return torch.cat(parts)


def sample_grid_prompts(seed: int) -> list[str]:
    """Sixteen fixed captions for the sample grids: four per family, the last two of each family held out
    (singles: all train, there are no held-out singles)."""
    rng = random.Random(derive_seed(seed, 0, 0, SAMPLES_STREAM))
    prompts = []
    for family in FAMILIES:
        for split in ("train", "train", "heldout", "heldout"):
            split = "train" if family == "single" else split
            prompts.append(_caption_of_family(rng, family, split).text)
    return prompts


def _caption_of_family(rng: random.Random, family: str, split: str) -> Caption:
    while True:
        caption = sample_caption_spec(rng, split, size_probability=0.0)
        if caption.family == family:
            return caption


@torch.no_grad()
def write_samples(config: PretrainConfig, policy: Policy, path: Path) -> Path:
    """A grid of the sample-grid captions at 20 DDIM steps with guidance (fixed seeds) at ``path``."""
    prompts = sample_grid_prompts(config.seed)
    seeds = [derive_seed(config.seed, 1, i, SAMPLES_STREAM) for i in range(len(prompts))]
    images = _sample_batched(policy, prompts, seeds, config.eval_guidance_scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, prompts, columns=8, cell=96).save(path)
    return path


def eval_captions(seed: int, split: str, family: str, n: int) -> list[str]:
    """``n`` fixed captions of ``family`` from ``split`` (sizes named as often as in training)."""
    rng = random.Random(derive_seed(seed, FAMILIES.index(family), int(split == "heldout"), EVAL_STREAM))
    captions = []
    while len(captions) < n:
        caption = sample_caption_spec(rng, split)
        if caption.family == family:
            captions.append(caption.text)
    return captions


@torch.no_grad()
def evaluate_base_model(policy: Policy, seed: int, samples_per_family: int, guidance_scale: float,
                        num_inference_steps: int = EVAL_STEPS) -> dict:
    """Strict accuracy and mean score of the verifiable reward per split and family, at ``num_inference_steps``
    DDIM steps (default 20; η = 0).

    Returns ``{split: {family: {"strict": …, "score": …, "n": …}}}`` (no singles in the held-out split).
    """
    reward, results = ShapesReward(), {}
    for split in ("train", "heldout"):
        results[split] = {}
        for family in FAMILIES:
            if split == "heldout" and family == "single":
                continue
            prompts = eval_captions(seed, split, family, samples_per_family)
            seeds = [derive_seed(seed, FAMILIES.index(family), i, EVAL_STREAM) for i in range(len(prompts))]
            images = _sample_batched(policy, prompts, seeds, guidance_scale, num_inference_steps=num_inference_steps)
            score, strict = reward.evaluate(images, prompts)
            results[split][family] = {"strict": round(strict.float().mean().item(), 4),
                                      "score": round(score.mean().item(), 4), "n": len(prompts)}
    return results


# ------------------------------------------------------------------------------------------------- driver


def _check_images(config: PretrainConfig, split: str) -> tuple[list[str], torch.Tensor]:
    """The fixed scenes of ``split`` used to scale the latents and check the VAE (at least 64)."""
    return _examples(config.seed, int(split == "heldout"), VAE_CHECK_STREAM, max(64, config.vae_check_samples), split)


def train_and_check_vae(config: PretrainConfig, vae) -> dict:
    """Stage 1, then the latent scaling factor and the detector check on reconstructions; returns the report."""
    recon_loss = train_vae(config, vae)
    check = {split: _check_images(config, split) for split in ("train", "heldout")}
    std = latent_std(vae, check["train"][1], _generator(config.seed, 0, LATENT_STREAM))
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    accuracy = {split: {k: round(v, 4) for k, v in vae_reconstruction_accuracy(vae, *check[split]).items()}
                for split in check}
    report = {"reconstruction_loss": round(recon_loss, 5), "scaling_factor": vae.config.scaling_factor,
              "detector_on_reconstructions": accuracy}
    tqdm.write(f"pretrain shapes: VAE done: {json.dumps(report)}")
    return report


def model_summary(policy: Policy) -> dict:
    """Architecture facts for the model card."""
    unet, vae, text = policy.base_unet.config, policy.vae.config, policy.text_encoder.config
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {
        "latent_shape": "×".join(map(str, policy.latent_shape)),
        "vae_channels": "/".join(map(str, vae.block_out_channels)),
        "unet_channels": "/".join(map(str, unet.block_out_channels)),
        "unet_blocks": ", ".join(unet.down_block_types),
        "text_width": text.hidden_size,
        "text_layers": text.num_hidden_layers,
        "max_tokens": policy.tokenizer.model_max_length,
        "prediction_type": policy.schedule.prediction_type,
        "parameters": {"unet": count(policy.base_unet), "vae": count(policy.vae),
                       "text_encoder": count(policy.text_encoder)},
    }


def pretrain_command(config: PretrainConfig) -> str:
    """The ``diffalign pretrain shapes`` command line that reproduces ``config`` (non-default fields only;
    ``--output-dir`` left out)."""
    default = PretrainConfig()
    flags = [f"--{name.replace('_', '-')} {value}" for name, value in asdict(config).items()
             if value != getattr(default, name) and name != "output_dir"]
    return " ".join(["diffalign pretrain shapes", *flags])


def pretrain(config: PretrainConfig) -> Path:
    """Trains the ShapesWorld base model (module docstring) and writes the pipeline folder; returns its path."""
    config.check()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        start = time.perf_counter()
        pipeline = shapes_model.build_pipeline(config.seed, config.prediction_type)
        vae_report = train_and_check_vae(config, pipeline.vae)
        vae_seconds = time.perf_counter() - start
        ema = train_diffusion(config, pipeline, output_dir)
        train_seconds = time.perf_counter() - start
        with ema.applied():
            shapes_model.save_pipeline(pipeline, output_dir)
        policy = load_policy(str(output_dir))  # evaluate what was written, as users will load it
        write_samples(config, policy, output_dir / "samples" / "final.png")
        accuracy = {}
        if config.eval_samples_per_family:
            accuracy = evaluate_base_model(policy, config.seed, config.eval_samples_per_family,
                                           config.eval_guidance_scale)
        report = {
            "command": pretrain_command(config),
            "model": model_summary(policy),
            "config": {k: v for k, v in asdict(config).items() if k != "output_dir"},
            "evaluation": {"num_inference_steps": EVAL_STEPS, "guidance_scale": config.eval_guidance_scale,
                           "eta": 0.0, "samples_per_family": config.eval_samples_per_family},
            "accuracy": accuracy,
            "vae": vae_report,
            "wall_time_s": {"vae": round(vae_seconds), "unet": round(train_seconds - vae_seconds),
                            "total": round(time.perf_counter() - start)},
            "environment": {"torch": torch.__version__, "num_threads": config.num_threads,
                            "machine": platform.machine()},
        }
        (output_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        (output_dir / "README.md").write_text(readme(report))
        return output_dir
    finally:
        torch.set_num_threads(previous_threads)


def readme(report: dict) -> str:
    """The model card of the pipeline folder, from the :func:`pretrain` report (``eval.json``)."""
    config, accuracy, ev, m = report["config"], report["accuracy"], report["evaluation"], report["model"]
    rows = []
    for split, families in accuracy.items():
        for family, r in families.items():
            rows.append(f"| {split} | {family} | {r['strict']:.3f} | {r['score']:.3f} | {r['n']} |")
    vae = report["vae"]["detector_on_reconstructions"]
    minutes = report["wall_time_s"]["total"] / 60
    return f"""# ShapesWorld base model (`diffalign.models.shapes`)

A small text-to-image latent diffusion model in Stable-Diffusion format, pretrained by diffalign on
procedurally rendered ShapesWorld scenes (32×32, 1–4 coloured shapes) with captions from the grammar's
**train split only**. Load it with `diffalign.models.load_policy("shapes")` or, offline, with plain diffusers:
`StableDiffusionPipeline.from_pretrained(diffalign.models.shapes.base_model_path())`.

- VAE: AutoencoderKL, 32×32×3 ⇄ {m["latent_shape"]} latents (channels {m["vae_channels"]}, scaling factor
  {report["vae"]["scaling_factor"]}); {m["parameters"]["vae"]:,} parameters.
- UNet: UNet2DConditionModel, channels {m["unet_channels"]}, blocks {m["unet_blocks"]};
  {m["parameters"]["unet"]:,} parameters.
- Text encoder: CLIPTextModel (width {m["text_width"]}, {m["text_layers"]} layers; {m["parameters"]["text_encoder"]:,}
  parameters, mostly the 49,408-token embedding) trained from scratch with OpenAI CLIP's BPE tokenizer (max
  {m["max_tokens"]} tokens).
- Scheduler: DDIM with SD 1.x's betas (scaled-linear 0.00085–0.012, 1000 steps, leading spacing),
  prediction type `{m["prediction_type"]}`.

## How it was trained

    {report["command"]}

Seed {config["seed"]}, {config["num_threads"]} CPU threads; VAE {config["vae_steps"]} steps × {config["vae_batch_size"]}
scenes, then UNet + text encoder {config["unet_steps"]} steps × {config["unet_batch_size"]} (caption dropout
{config["caption_dropout"]}, EMA {config["ema_decay"]}); wall time {minutes:.1f} min
(VAE {report["wall_time_s"]["vae"]} s, UNet {report["wall_time_s"]["unet"]} s); torch {report["environment"]["torch"]}.
Same seed and thread count → identical weights (CPU, fp32).

## Evaluation (`eval.json`)

The verifiable reward (`diffalign.rewards.shapes`) at {ev["num_inference_steps"]} DDIM steps, η = {ev["eta"]},
guidance scale {ev["guidance_scale"]}, {ev["samples_per_family"]} fixed captions per family and split
(the held-out split has no single-object captions; its objects are all seen alone in training, never composed).

| split | family | strict accuracy | mean score | n |
|---|---|---|---|---|
{chr(10).join(rows)}

Detector strict accuracy on VAE reconstructions: train {vae["train"]["strict"]:.3f}, held-out
{vae["heldout"]["strict"]:.3f}. Sample grids are in `samples/`.
"""
