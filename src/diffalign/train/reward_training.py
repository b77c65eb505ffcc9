"""Train the learned ShapesWorld reward (:mod:`diffalign.rewards.shapes_learned`) on freshly rendered data.

Data (:func:`make_examples`): each example draws a caption (from the train or held-out caption split) and either
the caption's own scene (a *positive*, :func:`diffalign.world.scene_for_caption`) or a *perturbed* scene that
breaks some of its constraints (:func:`perturbed_scene`: wrong colour, wrong shape, wrong size, an extra or a
missing object, a reversed relation, or an unrelated random scene). With probability ``augment_probability`` the
rendered image is degraded like an imperfect diffusion sample (:func:`degrade`: Gaussian blur, pixel noise, faded
contrast, a colour cast). The regression target is the verifiable reward's score of *that* final image
(``ShapesReward().evaluate``), so targets are exact, never assumed: a positive blurred beyond recognition gets
the score the detector gives it.

A pool of ``num_examples`` examples is rendered at the start (rendering plus detection cost ~2 ms per example
on one core, as much as training on it once), then ``steps`` minibatches are drawn from it with a random
horizontal flip that also mirrors the caption's relation ("left of" ↔ "right of"): the detector is
mirror-equivariant, so the flipped example's target is the same exact score.

Loss: binary cross-entropy between ``sigmoid(logit)`` and the score. Everything is a function of ``seed``: same
seed, same thread count → same weights. The agreement report (:func:`evaluate_agreement`) is written as JSON
next to the weights: for each caption split, ``eval_pairs`` fresh pairs (half positive, half perturbed, drawn
from ``eval_seed``), augmented as in training and clean.

Run (the shipped weights: the defaults — seed 0, 40 000 examples, 4000 steps of 64, one thread — took 8 min 18 s
on a shared 2-core CPU: 79 s rendering, 409 s training)::

    python -m diffalign.train.reward_training --output src/diffalign/rewards/assets/shapes-reward.safetensors
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffalign.rewards.shapes import ShapesReward
from diffalign.rewards.shapes_learned import ShapesRewardModel, encode_caption
from diffalign.world.captions import (
    SPLITS,
    Caption,
    caption_split,
    relation_holds,
    sample_caption_spec,
    scene_for_caption,
)
from diffalign.world.render import render_tensor
from diffalign.world.scenes import (
    BACKGROUND, COLOURS, MAX_OBJECTS, SHAPES, SIZES, Object, Scene, place_objects, sample_scene,
)

PERTURBATIONS = ("colour", "shape", "size", "add", "remove", "relation", "random")
"""The edits :func:`perturbed_scene` applies (``relation`` only to relation captions)."""
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_MIRROR = {"left of": "right of", "right of": "left of", "above": "above", "below": "below"}
_CLEAR_GAP_PX = 6.0
_BACKGROUND = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 255


@dataclass
class RewardTrainingConfig:
    """How to train the learned ShapesWorld reward (module docstring)."""

    seed: int = 0
    """Seed of everything random in training: the rendered pool, the initial weights, the minibatches."""
    steps: int = 4000
    """Optimizer steps."""
    batch_size: int = 64
    """Examples per optimizer step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up over the first 5 % of steps, then cosine decay to 5 % of it)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    num_examples: int = 40_000
    """Size of the freshly rendered training pool (each is seen about steps·batch_size/num_examples times)."""
    positive_fraction: float = 0.5
    """Fraction of the pool that shows exactly its caption (the rest is perturbed)."""
    heldout_fraction: float = 0.4
    """Fraction of captions drawn from the held-out caption split (0 trains on train-split captions only)."""
    size_probability: float = 0.5
    """Probability that a caption's noun phrase names its size."""
    augment_probability: float = 0.5
    """Probability that an image is degraded like an imperfect diffusion sample (:func:`degrade`)."""
    eval_pairs: int = 1000
    """Evaluation pairs per caption split in the report (half positive, half perturbed)."""
    eval_seed: int = 1_000_003
    """Seed of the evaluation pairs (keep it apart from ``seed`` so they are fresh)."""
    output: Path = Path("runs/shapes-reward/shapes-reward.safetensors")
    """Where the weights go (safetensors); the report goes beside it as ``<stem>-eval.json``."""
    num_threads: int | None = 1
    """torch threads for training (None leaves torch's default). On a shared 2-core machine 1 is much faster than
    2: with another busy process, two OpenMP threads spin against it (measured 1.5 s vs 0.09 s per step)."""
    progress: bool = True
    """Show a tqdm progress bar."""

    @property
    def report_path(self) -> Path:
        """``<output stem>-eval.json`` beside the weights."""
        return Path(self.output).with_name(Path(self.output).stem + "-eval.json")

    def validate(self) -> list[str]:
        """Every problem with this config, each naming the field, the value and what is allowed."""
        errors = [
            f"{name} must be >= {low}, got {value}"
            for name, value, low in [("steps", self.steps, 1), ("batch_size", self.batch_size, 1),
                                     ("num_examples", self.num_examples, 1), ("eval_pairs", self.eval_pairs, 2)]
            if value < low
        ]
        fractions = ("positive_fraction", "heldout_fraction", "size_probability", "augment_probability")
        errors += [
            f"{name} must be in [0, 1], got {getattr(self, name)}"
            for name in fractions
            if not 0 <= getattr(self, name) <= 1
        ]
        if not self.lr > 0:
            errors.append(f"lr must be > 0, got {self.lr}")
        return errors

    def check(self) -> RewardTrainingConfig:
        """Raises ValueError listing every problem (see :meth:`validate`); returns the config."""
        errors = self.validate()
        if errors:
            raise ValueError("invalid RewardTrainingConfig: " + "; ".join(errors))
        return self


# --- data -------------------------------------------------------------------------------------------------------


def _clear(relation: str, a: Object, b: Object) -> bool:
    """``a`` is ``relation`` ``b`` by a clear gap and along the dominant axis (as generated relation scenes are)."""
    dx, dy = abs(b.centre[0] - a.centre[0]), abs(b.centre[1] - a.centre[1])
    along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    return relation_holds(relation, a.centre, b.centre, _CLEAR_GAP_PX) and along >= across


def _edit(specs: list[tuple[str, str, str]], edit: str, rng: random.Random) -> None:
    """Applies one perturbation (not ``relation``/``random``) to (shape, colour, size) specs in place."""
    if edit == "add":
        if len(specs) < MAX_OBJECTS:
            shape, colour, _ = rng.choice(specs) if specs and rng.random() < 0.5 else (
                rng.choice(SHAPES), rng.choice(tuple(COLOURS)), None)
            specs.append((shape, colour, rng.choice(tuple(SIZES))))
        return
    if not specs:
        return
    i = rng.randrange(len(specs))
    shape, colour, size = specs[i]
    if edit == "remove":
        specs.pop(i)
    elif edit == "colour":
        specs[i] = (shape, rng.choice([c for c in COLOURS if c != colour]), size)
    elif edit == "shape":
        specs[i] = (rng.choice([s for s in SHAPES if s != shape]), colour, size)
    elif edit == "size":
        specs[i] = (shape, colour, next(s for s in SIZES if s != size))
    else:  # the caller passes PERTURBATIONS only
        raise AssertionError(edit)


def perturbed_scene(caption: Caption, rng: random.Random) -> Scene:
    """A scene for ``caption`` with one or two perturbations (:data:`PERTURBATIONS`), possibly an empty scene.

    The result may still satisfy some (rarely all) of the caption's constraints; the exact score is measured
    on the rendered image, never assumed.
    """
    allowed = [p for p in PERTURBATIONS if p != "relation" or caption.relation is not None]
    edits = [rng.choice(allowed) for _ in range(1 if rng.random() < 0.65 else 2)]
    if "random" in edits:
        return sample_scene(rng)
    specs = [(p.shape, p.colour, p.size or rng.choice(tuple(SIZES))) for p in caption.objects for _ in range(p.count)]
    for edit in edits:
        if edit != "relation":
            _edit(specs, edit, rng)
    if not specs:
        return Scene(())
    accept = None
    if caption.relation is not None and len(specs) >= 2:
        if "relation" in edits:
            wanted = _OPPOSITE[caption.relation] if rng.random() < 0.7 else None
        else:
            wanted = caption.relation if rng.random() < 0.7 else None
        if wanted is not None:
            accept = lambda placed: _clear(wanted, placed[0], placed[1])  # noqa: E731
    try:
        return place_objects(specs, rng, accept)
    except ValueError:  # the wanted relation could not be placed: any placement will do
        return place_objects(specs, rng)


def degrade(image: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """An imperfect-diffusion-sample look for ``[3, H, W]`` in [0, 1]: each of Gaussian blur (σ 0.3–1.2 px),
    pixel noise (σ 0.01–0.08), contrast faded towards the background (×0.5–1) and a colour cast (±0.04 per
    channel) applied with probability 1/2, 1/2, 1/3, 1/3. Deterministic given ``rng``."""
    if rng.random() < 0.5:
        sigma = rng.uniform(0.3, 1.2)
        taps = torch.arange(-2, 3, dtype=torch.float32)
        kernel = torch.exp(-(taps**2) / (2 * sigma**2))
        kernel = (kernel / kernel.sum()).view(1, 1, 1, 5)
        padded = F.pad(image[:, None], (2, 2, 2, 2), mode="replicate")
        image = F.conv2d(F.conv2d(padded, kernel), kernel.transpose(-1, -2))[:, 0]
    if rng.random() < 0.5:
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(rng.getrandbits(62)))
        image = image + rng.uniform(0.01, 0.08) * noise
    if rng.random() < 1 / 3:
        image = _BACKGROUND + rng.uniform(0.5, 1.0) * (image - _BACKGROUND)
    if rng.random() < 1 / 3:
        image = image + torch.tensor([rng.uniform(-0.04, 0.04) for _ in range(3)])[:, None, None]
    return image.clamp(0, 1)


def mirror_caption(caption: Caption) -> Caption:
    """The caption of the horizontally flipped scene: "left of" ↔ "right of", everything else unchanged."""
    if caption.relation is None:
        return caption
    return Caption(caption.family, caption.objects, _MIRROR[caption.relation])


@dataclass
class Examples:
    """A rendered dataset: ``captions`` (N texts), ``splits`` (N of "train"/"heldout"), ``positive [N]`` bool,
    ``images [N, 3, 32, 32]`` in [0, 1], ``targets [N]`` the verifiable score, ``strict [N]`` all constraints met,
    ``encodings [N, CAPTION_DIM]`` and ``mirrored [N, CAPTION_DIM]`` (the caption of the flipped image)."""

    captions: list[str]
    splits: list[str]
    positive: torch.Tensor
    images: torch.Tensor
    targets: torch.Tensor
    strict: torch.Tensor
    encodings: torch.Tensor
    mirrored: torch.Tensor = field(repr=False)


def make_examples(
    n: int,
    rng: random.Random,
    *,
    split: str | None = None,
    heldout_fraction: float = 0.4,
    positive_fraction: float = 0.5,
    size_probability: float = 0.5,
    augment_probability: float = 0.5,
    progress: bool = False,
) -> Examples:
    """Renders ``n`` examples (module docstring) from ``rng``. ``split`` fixes the caption split, else each
    caption's split is held-out with probability ``heldout_fraction``. Exactly ``round(n · positive_fraction)``
    examples are positives, in a shuffled order."""
    n_positive = round(n * positive_fraction)
    flags = [True] * n_positive + [False] * (n - n_positive)
    rng.shuffle(flags)
    captions, splits, images = [], [], []
    for positive in tqdm(flags, desc="rendering", disable=not progress, leave=False):
        chosen = split or ("heldout" if rng.random() < heldout_fraction else "train")
        caption = sample_caption_spec(rng, chosen, size_probability)
        scene = scene_for_caption(caption, rng) if positive else perturbed_scene(caption, rng)
        image = render_tensor(scene)
        if rng.random() < augment_probability:
            image = degrade(image, rng)
        captions.append(caption)
        splits.append(chosen)
        images.append(image)
    stacked = torch.stack(images)
    texts = [c.text for c in captions]
    verifiable = ShapesReward()
    scores, stricts = zip(*(verifiable.evaluate(stacked[i : i + 1024], texts[i : i + 1024]) for i in range(0, n, 1024)))
    return Examples(
        captions=texts,
        splits=splits,
        positive=torch.tensor(flags),
        images=stacked,
        targets=torch.cat(scores),
        strict=torch.cat(stricts),
        encodings=torch.stack([encode_caption(c) for c in captions]),
        mirrored=torch.stack([encode_caption(mirror_caption(c)) for c in captions]),
    )


# --- training and evaluation ------------------------------------------------------------------------------------


def _learning_rate(config: RewardTrainingConfig, step: int) -> float:
    warmup = max(1, config.steps // 20)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _fit(model: ShapesRewardModel, data: Examples, config: RewardTrainingConfig) -> list[float]:
    """Trains ``model`` in place for ``config.steps`` minibatches with random mirror flips; returns the losses."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(config.steps), desc="training reward", disable=not config.progress)
    for step in bar:
        index = torch.randint(len(data.captions), (config.batch_size,), generator=generator)
        flip = torch.rand(config.batch_size, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], data.images[index].flip(-1), data.images[index])
        captions = torch.where(flip[:, None], data.mirrored[index], data.encodings[index])
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        loss = F.binary_cross_entropy_with_logits(model(images, captions), data.targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return losses


@torch.no_grad()
def agreement(predicted: torch.Tensor, data: Examples) -> dict[str, float]:
    """Agreement of predicted scores ``[N]`` with the verifiable reward on ``data``.

    ``pearson``/``mae``: against the score; ``binary_agreement``: ``predicted > 0.5`` vs strict (as asked of
    the report; partial-credit negatives, whose score is often ≥ 0.5, count against it);
    ``strict_agreement_at_0.9``: ``predicted > 0.9`` vs strict (a score < 1 is at most 5/6 in the grammar, so
    0.9 separates all-correct from the rest); ``score_agreement_at_0.5``: both sides of 0.5.
    """
    target, strict = data.targets, data.strict
    pearson = torch.corrcoef(torch.stack([predicted, target]))[0, 1].item()
    return {
        "n": len(target),
        "pearson": pearson,
        "mae": (predicted - target).abs().mean().item(),
        "binary_agreement": ((predicted > 0.5) == strict).float().mean().item(),
        "strict_agreement_at_0.9": ((predicted > 0.9) == strict).float().mean().item(),
        "score_agreement_at_0.5": ((predicted > 0.5) == (target > 0.5)).float().mean().item(),
        "mae_positive": (predicted - target)[data.positive].abs().mean().item(),
        "mae_perturbed": (predicted - target)[~data.positive].abs().mean().item(),
        "strict_fraction": strict.float().mean().item(),
        "target_mean": target.mean().item(),
    }


@torch.no_grad()
def predict(model: ShapesRewardModel, images: torch.Tensor, encodings: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """``model.score`` ``[N]`` over images ``[N, 3, 32, 32]`` and caption vectors ``[N, CAPTION_DIM]``, in eval mode."""
    model.eval()
    scores = [model.score(images[i : i + batch], encodings[i : i + batch]) for i in range(0, len(images), batch)]
    return torch.cat(scores)


def evaluate_agreement(model: ShapesRewardModel, config: RewardTrainingConfig) -> dict[str, dict[str, dict]]:
    """``{split: {"augmented": metrics, "clean": metrics}}`` on ``config.eval_pairs`` fresh pairs per split
    (half positive, half perturbed; :func:`agreement`)."""
    report: dict[str, dict[str, dict]] = {}
    for i, split in enumerate(SPLITS):
        report[split] = {}
        for condition, augment in (("augmented", config.augment_probability), ("clean", 0.0)):
            rng = random.Random(f"{config.eval_seed}/{split}/{condition}")
            data = make_examples(config.eval_pairs, rng, split=split, positive_fraction=0.5,
                                 size_probability=config.size_probability, augment_probability=augment)
            assert all(caption_split(c) == split for c in data.captions)
            report[split][condition] = agreement(predict(model, data.images, data.encodings), data)
    return report


def train_reward_model(config: RewardTrainingConfig) -> Path:
    """Renders the pool, trains :class:`ShapesRewardModel`, writes the weights to ``config.output`` (safetensors,
    with the config in its metadata) and the agreement report to ``config.report_path``; returns the weights path."""
    from safetensors.torch import save_file

    config.check()
    threads = torch.get_num_threads()
    start = time.perf_counter()
    torch.set_num_threads(1)  # rendering runs tiny per-image ops: extra threads only contend
    try:
        data = make_examples(
            config.num_examples, random.Random(config.seed), heldout_fraction=config.heldout_fraction,
            positive_fraction=config.positive_fraction, size_probability=config.size_probability,
            augment_probability=config.augment_probability, progress=config.progress,
        )
    finally:
        torch.set_num_threads(config.num_threads or threads)
    render_seconds = time.perf_counter() - start
    torch.manual_seed(config.seed)
    model = ShapesRewardModel()
    losses = _fit(model, data, config)
    train_seconds = time.perf_counter() - start - render_seconds
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(output), metadata={"format": "pt", "config": json.dumps(settings)})
    report = {
        "config": settings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pool": {"n": config.num_examples, "strict_fraction": data.strict.float().mean().item(),
                 "target_mean": data.targets.mean().item()},
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "seconds": {"render": round(render_seconds, 1), "train": round(train_seconds, 1)},
        "threads": torch.get_num_threads(),
        "agreement": evaluate_agreement(model, config),
    }
    config.report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    torch.set_num_threads(threads)
    return output


if __name__ == "__main__":
    import tyro

    print(train_reward_model(tyro.cli(RewardTrainingConfig)))
