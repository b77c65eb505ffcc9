"""Train RCGD's reward model μ(z_t, t) (:mod:`diffalign.models.latent_reward`) on a model's VAE latents.

Data (:func:`labelled_latents`): images from one source — ``generated`` (the model's own samples; their x_0
latents are used as they are), ``renders`` (ShapesWorld renders of captions, encoded by the VAE) or a folder of
images (encoded; prompts from the folder's ``prompts.txt``, one line per image in file-name order, else empty) —
labelled by a registered reward plus Gaussian noise of std ``label_noise`` (the paper's pseudo-labels
ŷ = f(x) + ξ; its recipe is ``labels=random_classifier`` with std 0.1). The labelled set is cached in the output
folder, split into training and held-out latents by a seeded permutation.

Training (as the reference's ``train.py``): every epoch visits each training latent once, at a timestep drawn
uniformly from all the schedule's training timesteps (the reference draws from its 50 inference steps; all of
them serve any step count), noised by q(z_t | z_0) with fresh noise, and regresses the label by MSE with Adam.
The held-out MSE is measured every epoch at fixed timesteps and noise, overall and by noise band, next to the
variance of the held-out labels (the MSE of always answering their mean).

Resumable: ``checkpoint.pt`` (weights, optimizer, epoch, random state, history) is written after every epoch; a
run pointed at a folder with a checkpoint of the same settings continues from it, and the same settings give the
same weights either way. The finished model is saved as a folder μ can be loaded from, with ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffalign import prompts as prompt_sources
from diffalign import rewards
from diffalign.models import load_policy
from diffalign.models.latent_reward import LatentRewardConfig, LatentRewardModel
from diffalign.models.policy import Policy
from diffalign.rollout import StepSettings, derive_seed, sample, sample_seed
from diffalign.samplers import q_sample

DATA_FILE, CHECKPOINT_FILE, METRICS_FILE = "data.pt", "checkpoint.pt", "metrics.json"
#: Random streams of the trainer (labels' noise, split, training draws, held-out draws).
LABEL_STREAM, SPLIT_STREAM, TRAIN_STREAM, HELDOUT_STREAM = 30, 31, 32, 33
NOISE_BANDS = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class LatentRewardTrainingConfig:
    """Train a reward model μ(z_t, t) on a model's VAE latents (RCGD's regressor)."""

    out: str
    """Folder for the data cache, the checkpoint and the trained model."""
    model: str = "tiny"
    """Model whose VAE latents μ reads: 'tiny', 'shapes', a pipeline folder or a hub id."""
    labels: str = "random_classifier"
    """Registered reward that labels the images (random_classifier: the paper's recipe)."""
    label_noise: float = 0.1
    """Std of the Gaussian noise added to the labels."""
    source: str = "generated"
    """Images: 'generated' (the model's samples), 'renders' (ShapesWorld renders) or a folder of images."""
    prompts: str | None = None
    """Prompt source for generated images and renders (default: shapes for the shapes model, else simple_animals)."""
    num_images: int = 512
    """Images to label (generated and renders; a folder gives its own count)."""
    heldout_fraction: float = 0.125
    """Fraction of the labelled latents held out for the MSE report."""
    sample_steps: int = 20
    """DDIM steps of the generated images."""
    guidance_scale: float = 3.0
    """Classifier-free guidance of the generated images."""
    time_conditioning: bool = True
    """Whether μ sees the timestep (False: the reference's time-agnostic regressor)."""
    channels: tuple[int, ...] = (64, 128, 256)
    """Channels of μ's residual blocks."""
    epochs: int = 30
    """Passes over the training latents."""
    batch_size: int = 64
    """Latents per optimizer step."""
    learning_rate: float = 1e-3
    """Adam learning rate (the reference's)."""
    seed: int = 0
    """Seed of the images, the label noise, the split and the training draws."""

    def validate(self) -> list[str]:
        errors = []
        if self.labels not in rewards.names():
            errors.append(f"labels {self.labels!r} is not a registered reward; choose one of {', '.join(rewards.names())}")
        if self.source not in ("generated", "renders") and not Path(self.source).is_dir():
            errors.append(f"source must be 'generated', 'renders' or a folder of images, got {self.source!r} "
                          "(no such folder)")
        for name in ("num_images", "sample_steps", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.heldout_fraction < 1:
            errors.append(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.label_noise < 0:
            errors.append(f"label_noise must be >= 0, got {self.label_noise}")
        if self.learning_rate <= 0:
            errors.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.channels or min(self.channels) < 1:
            errors.append(f"channels must be positive widths, got {self.channels}")
        if self.prompts is not None:
            try:
                prompt_sources.check(self.prompts)
            except ValueError as error:
                errors.append(f"prompts: {error}")
        return errors

    def data_settings(self) -> dict:
        """The fields the labelled data depends on (a cached data file made with others is refused)."""
        keys = ("model", "labels", "label_noise", "source", "prompts", "num_images", "heldout_fraction",
                "sample_steps", "guidance_scale", "seed")
        return {key: getattr(self, key) for key in keys}


def _prompt_source(config: LatentRewardTrainingConfig):
    return prompt_sources.get(config.prompts or ("shapes" if config.model == "shapes" else "simple_animals"))


def _folder_images(folder: Path, policy: Policy) -> tuple[torch.Tensor, list[str]]:
    """The folder's images resized to the model's image size ``[n, 3, H, W]`` and their prompts."""
    from PIL import Image

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"source folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    prompt_file = folder / "prompts.txt"
    prompts = prompt_file.read_text().splitlines() if prompt_file.is_file() else [""] * len(paths)
    if len(prompts) != len(paths):
        raise ValueError(f"{str(prompt_file)!r} has {len(prompts)} lines for {len(paths)} images (one per image, "
                         "in file-name order)")
    size = policy.image_size
    arrays = [np.asarray(Image.open(p).convert("RGB").resize(size[::-1], Image.BICUBIC)) for p in paths]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return images, prompts


def _render_images(config: LatentRewardTrainingConfig, policy: Policy) -> tuple[torch.Tensor, list[str]]:
    from diffalign.world.captions import scene_for_caption
    from diffalign.world.render import render_batch

    captions = _prompt_source(config).draw(config.num_images, torch.Generator().manual_seed(config.seed))
    scenes = [scene_for_caption(c, derive_seed(config.seed, 0, i, LABEL_STREAM)) for i, c in enumerate(captions)]
    images = render_batch(scenes)
    if tuple(images.shape[-2:]) != policy.image_size:
        images = F.interpolate(images, size=policy.image_size, mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(0, 1), captions


def _encode(policy: Policy, images: torch.Tensor, seed: int, batch_size: int = 64) -> torch.Tensor:
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    with torch.no_grad():
        return torch.cat([policy.encode(images[i : i + batch_size].to(policy.device), generator).float().cpu()
                          for i in tqdm(range(0, len(images), batch_size), desc="encoding", leave=False)]).contiguous()


@torch.no_grad()
def labelled_latents(config: LatentRewardTrainingConfig, policy: Policy) -> dict:
    """Latents ``[n, C, h, w]``, noisy labels ``[n]``, clean labels ``[n]`` and prompts of the configured source."""
    if config.source == "generated":
        prompts = _prompt_source(config).draw(config.num_images, torch.Generator().manual_seed(config.seed))
        seeds = [sample_seed(config.seed, 0, i) for i in range(len(prompts))]
        settings = StepSettings(config.sample_steps, config.guidance_scale, eta=1.0)
        latents, images = [], []
        for i in tqdm(range(0, len(prompts), 64), desc="generating"):
            rollout = sample(policy, prompts[i : i + 64], seeds[i : i + 64], settings)
            latents.append(rollout.latents[:, -1].float().cpu())
            images.append(rollout.images.cpu())
        latents, images = torch.cat(latents), torch.cat(images)
    else:
        images, prompts = (_render_images(config, policy) if config.source == "renders"
                           else _folder_images(Path(config.source), policy))
        latents = _encode(policy, images, derive_seed(config.seed, 0, 0, LABEL_STREAM))
    labeller = rewards.get(config.labels, device=policy.device)
    clean = torch.cat([labeller(images[i : i + 64].to(policy.device), prompts[i : i + 64]).float().cpu()
                       for i in range(0, len(images), 64)])
    noise = torch.randn(len(clean), generator=torch.Generator().manual_seed(derive_seed(config.seed, 0, 1,
                                                                                          LABEL_STREAM)))
    return {"latents": latents.contiguous(), "labels": clean + config.label_noise * noise, "clean_labels": clean,
            "prompts": list(prompts), "settings": config.data_settings()}


def _load_or_make_data(config: LatentRewardTrainingConfig, policy: Policy, out: Path) -> dict:
    path = out / DATA_FILE
    if path.is_file():
        data = torch.load(path, weights_only=False)
        if data["settings"] == config.data_settings():
            return data
        raise ValueError(f"{str(path)!r} was made with other data settings ({data['settings']}); use a new --out "
                         "or delete it")
    data = labelled_latents(config, policy)
    torch.save(data, path)
    return data


def _split(n: int, config: LatentRewardTrainingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(config.seed, 0, 0, SPLIT_STREAM)))
    held = max(1, round(n * config.heldout_fraction))
    if held >= n:
        raise ValueError(f"{n} labelled latents are too few to hold {held} out; label more images")
    return order[held:], order[:held]


@torch.no_grad()
def heldout_report(model: LatentRewardModel, latents: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor,
                   seed: int) -> dict:
    """Held-out MSE at fixed timesteps and noise: overall, at t = 0 (clean latents), by noise band, and the
    variance of the labels (the MSE of answering their mean)."""
    total = len(alphas_cumprod)
    generator = torch.Generator().manual_seed(derive_seed(seed, 0, 0, HELDOUT_STREAM))
    t = torch.randint(total, (len(latents),), generator=generator)
    noisy = q_sample(latents, torch.randn(latents.shape, generator=generator), t, alphas_cumprod)
    errors = (model(noisy, t) - labels).square()
    clean = (model(latents, torch.zeros_like(t)) - labels).square().mean().item()
    band = (t * NOISE_BANDS) // total
    by_band = {f"t_{b * total // NOISE_BANDS}_{(b + 1) * total // NOISE_BANDS}": errors[band == b].mean().item()
               for b in range(NOISE_BANDS) if (band == b).any()}
    return {"mse": errors.mean().item(), "mse_clean": clean, "mse_by_noise": by_band,
            "label_variance": labels.var(unbiased=False).item()}


def train_latent_reward(config: LatentRewardTrainingConfig) -> Path:
    """Labels the data (or reuses the cached data), trains μ with resume, saves it; returns the folder."""
    errors = config.validate()
    if errors:
        raise ValueError("reward-model train: invalid config:\n  - " + "\n  - ".join(errors))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = load_policy(config.model)
    data = _load_or_make_data(config, policy, out)
    train_rows, held_rows = _split(len(data["labels"]), config)
    labels = data["labels"]
    with torch.random.fork_rng(devices=[]):  # the initial weights are a function of the seed
        torch.manual_seed(derive_seed(config.seed, 0, 0, TRAIN_STREAM))
        model = LatentRewardModel(LatentRewardConfig(
            policy.latent_shape, float(policy.vae.config.scaling_factor), config.channels, config.time_conditioning,
            labels[train_rows].min().item(), labels[train_rows].max().item(), config.model, config.labels))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    alphas_cumprod = policy.schedule.alphas_cumprod.float().cpu()
    start, history = _resume(out / CHECKPOINT_FILE, config, model, optimizer)
    progress = tqdm(range(start, config.epochs), initial=start, total=config.epochs, desc="reward model")
    for epoch in progress:
        generator = torch.Generator().manual_seed(derive_seed(config.seed, epoch, 0, TRAIN_STREAM))
        model.train()
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        losses = []
        for i in range(0, len(order), config.batch_size):
            rows = order[i : i + config.batch_size]
            t = torch.randint(len(alphas_cumprod), (len(rows),), generator=generator)
            z_t = q_sample(data["latents"][rows], torch.randn(data["latents"][rows].shape, generator=generator), t,
                           alphas_cumprod)
            loss = F.mse_loss(model(z_t, t), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        report = heldout_report(model, data["latents"][held_rows], labels[held_rows], alphas_cumprod, config.seed)
        history.append({"epoch": epoch + 1, "train_mse": sum(losses) / len(losses), **report})
        progress.set_postfix(train_mse=f"{history[-1]['train_mse']:.4f}", heldout_mse=f"{report['mse']:.4f}")
        torch.save({"settings": dataclasses.asdict(config), "epoch": epoch + 1, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "history": history}, out / CHECKPOINT_FILE)
    model.save(out)
    metrics = {"config": dataclasses.asdict(config), "train_images": len(train_rows), "heldout_images": len(held_rows),
               "final": history[-1], "history": history}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return out


def _resume(path: Path, config: LatentRewardTrainingConfig, model: LatentRewardModel,
            optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """The epoch to start from and the history so far (0 and [] without a checkpoint)."""
    if not path.is_file():
        return 0, []
    state = torch.load(path, weights_only=False)
    if state["settings"] != dataclasses.asdict(config) | {"epochs": state["settings"]["epochs"]}:
        raise ValueError(f"{str(path)!r} is a checkpoint of other settings; use a new --out or delete it")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"], state["history"]
