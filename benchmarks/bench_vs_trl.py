"""DDPO epochs of diffalign and of TRL 0.23.1's ``DDPOTrainer`` side by side: same pipeline, settings and threads.

Both sides load one Stable-Diffusion-format pipeline folder and run the same DDPO epoch: 32 samples in
32 / ``batch`` sampling batches, 20 DDIM steps, η = 1, CFG 5, LoRA r = 4 (α = 4) on the attention projections
(to_q/k/v/out.0), JPEG compressibility reward, advantages normalised over the whole batch, training minibatches
of ``batch`` samples × every step with classifier-free guidance, accumulated into ONE optimizer step per epoch,
fp32, AdamW at 3e-4. Each run is its own process (``--threads`` torch threads); the runs alternate diffalign, TRL,
diffalign, TRL, … (``--rounds`` of each), and each side reports the median over all its runs of epochs 2..N
(epoch 1 is a warm-up) of:

    epoch_s    the whole epoch (sampling, reward, advantages, training)
    sample_s   sampling alone (the denoising chains and the VAE decode; reward scoring excluded)
    train_s    the training pass (re-scoring every transition, backward, the optimizer step)

besides ``cores_busy`` (process CPU time / wall time over those epochs), ``peak_rss_mb`` (the run's peak resident
set, loading and set-up included) and ``ratio_diffalign_to_trl = diffalign_epoch_s / trl_epoch_s``. Prints one JSON
object; progress goes to stderr.

TRL lives in a virtual environment of its own (``--trl-venv``, made on first use, never the project's): torch
pinned first (an unpinned torch pulls a multi-GB CUDA build), then trl 0.23.1 (the last release with DDPO) with
this environment's diffusers, transformers, accelerate, peft, numpy and pillow versions. The TRL worker times
``DDPOTrainer._generate_samples`` and ``_train_batched_samples`` by wrapping them on the trainer instance (the
installed package is not modified). The diffalign worker runs ``diffalign.train.loop.train`` and reads the loop's
own ``time/*`` metrics from the run folder; its evaluations before and after training and its final checkpoint
lie outside the timed epochs (the per-step KL-to-base measure, which TRL has no counterpart of, is off).

Models (``--model``): ``tiny`` is built here from a seed and cached: diffalign's tiny pipeline (VAE 32 px ⇄
4×16×16 latents, 2-layer CLIP text encoder, CLIP tokenizer, SD 1.x DDIM schedule) with a 0.79 M-parameter UNet
laid out as SD's (cross-attention at the finer 16×16 level, plain residual blocks at 8×8; diffalign's own tiny
UNet has them the other way round, 0.99 M). ``shapes`` is the embedded ShapesWorld model, trained on the same
JPEG reward, on ShapesWorld captions. A pipeline folder can be given instead.

    python benchmarks/bench_vs_trl.py --batch 8
    python benchmarks/bench_vs_trl.py --batch 32
    python benchmarks/bench_vs_trl.py --model shapes
"""

from __future__ import annotations

# Only the standard library at module level: the TRL worker imports this file inside TRL's environment, which has
# neither diffalign nor tyro.
import io
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TRL_VERSION = "0.23.1"
#: Packages TRL's environment pins to this environment's versions (besides torch, which is installed first).
PINNED_PACKAGES = ("diffusers", "transformers", "accelerate", "peft", "numpy", "pillow")
SIDES = ("diffalign", "trl")
SAMPLES_PER_EPOCH = 32
#: The attention projections both sides put LoRA on (TRL's DefaultDDPOStableDiffusionPipeline hard-codes them).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: The tiny benchmark UNet: diffalign's tiny UNet with SD's block layout (cross-attention at the finer level).
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
#: JPEG quality of the compressibility reward (diffalign.rewards.jpeg.JPEG_QUALITY, as DDPO).
JPEG_QUALITY = 95


@dataclass
class Args:
    batch: int = 8
    """Sampling and training batch size (8 or 32): 32 samples per epoch in 32 / batch batches, gradients
    accumulated over the 32 / batch training minibatches into one optimizer step per epoch."""
    model: str = "tiny"
    """tiny (the 0.79 M-UNet pipeline built here), shapes (the embedded ShapesWorld model) or a pipeline folder."""
    epochs: int = 5
    """Epochs per run; the first is a warm-up, medians are over epochs 2..epochs."""
    rounds: int = 2
    """Runs of each side, alternating diffalign, TRL, diffalign, TRL, …"""
    threads: int = 2
    """torch threads of each run."""
    seed: int = 0
    """Seed of the tiny pipeline's weights and of both trainers."""
    trl_venv: str | None = None
    """TRL's virtual environment, made on first use (default: <diffalign cache>/bench_vs_trl/venv-trl)."""


def settings(args: Args) -> dict:
    """The run settings both sides are configured from (what the JSON reports under ``settings``)."""
    if args.batch < 1 or SAMPLES_PER_EPOCH % args.batch:
        raise ValueError(f"--batch must divide the {SAMPLES_PER_EPOCH} samples per epoch (8 or 32), got {args.batch}")
    if args.epochs < 2:
        raise ValueError(f"--epochs must be >= 2 (epoch 1 is a warm-up and is not reported), got {args.epochs}")
    if args.rounds < 1 or args.threads < 1:
        raise ValueError(f"--rounds and --threads must be >= 1, got {args.rounds} and {args.threads}")
    minibatches = SAMPLES_PER_EPOCH // args.batch
    return {
        "samples_per_epoch": SAMPLES_PER_EPOCH, "sample_batch": args.batch, "sample_batches": minibatches,
        "train_batch": args.batch, "gradient_accumulation": minibatches, "optimizer_steps_per_epoch": 1,
        "steps": 20, "eta": 1.0, "guidance_scale": 5.0, "train_cfg": True, "timestep_fraction": 1.0,
        "inner_epochs": 1, "lora_rank": 4, "lora_alpha": 4.0, "lora_targets": list(LORA_TARGETS),
        "reward": "jpeg_compressibility", "advantages": "whole batch", "clip_range": 1e-4, "adv_clip_max": 5.0,
        "learning_rate": 3e-4, "max_grad_norm": 1.0, "precision": "fp32", "threads": args.threads,
        "epochs": args.epochs, "rounds": args.rounds, "measured_epochs": f"2..{args.epochs}", "seed": args.seed,
        "prompts": "shapes" if args.model == "shapes" else "simple_animals",
    }


def trl_config(s: dict) -> dict:
    """``trl.DDPOConfig`` keyword arguments for the settings ``s``.

    TRL accumulates over every trained step of every minibatch (its Accelerator's accumulation is
    ``train_gradient_accumulation_steps × num_train_timesteps``), so accumulation over all 32 / batch minibatches
    with every step trained is one optimizer step per epoch. ``save_freq`` beyond the run: no checkpoint is saved.
    """
    return dict(
        num_epochs=s["epochs"], seed=s["seed"], log_with=None, mixed_precision="no", allow_tf32=False,
        save_freq=10**9, sample_num_steps=s["steps"], sample_eta=s["eta"], sample_guidance_scale=s["guidance_scale"],
        sample_batch_size=s["sample_batch"], sample_num_batches_per_epoch=s["sample_batches"],
        train_batch_size=s["train_batch"], train_gradient_accumulation_steps=s["gradient_accumulation"],
        train_learning_rate=s["learning_rate"], train_max_grad_norm=s["max_grad_norm"],
        train_num_inner_epochs=s["inner_epochs"], train_cfg=s["train_cfg"], train_adv_clip_max=s["adv_clip_max"],
        train_clip_range=s["clip_range"], train_timestep_fraction=s["timestep_fraction"],
        per_prompt_stat_tracking=False, async_reward_computation=False,
    )


def diffalign_overrides(s: dict) -> dict:
    """Dotted overrides of the ``ddpo-tiny`` preset for the settings ``s`` (diffalign.config.replace)."""
    return {
        "prompts": s["prompts"], "epochs": s["epochs"], "seed": s["seed"], "log_with": "none",
        "save_freq": s["epochs"],  # only the checkpoint after the last epoch, outside the timed epochs
        "reward.name": s["reward"],
        "model.use_lora": True, "model.lora_rank": s["lora_rank"], "model.lora_alpha": s["lora_alpha"],
        "model.lora_target_modules": tuple(s["lora_targets"]), "model.mixed_precision": "no",
        "sample.num_inference_steps": s["steps"], "sample.eta": s["eta"], "sample.guidance_scale": s["guidance_scale"],
        "sample.batch_size_per_device": s["sample_batch"], "sample.num_batches_per_epoch": s["sample_batches"],
        "sample.samples_per_prompt": 1,
        "train.batch_size_per_device": s["train_batch"],
        "train.gradient_accumulation_steps": s["gradient_accumulation"],
        "train.learning_rate": s["learning_rate"], "train.max_grad_norm": s["max_grad_norm"],
        "method.timestep_fraction": s["timestep_fraction"], "method.num_inner_epochs": s["inner_epochs"],
        "method.cfg": s["train_cfg"], "method.clip_range": s["clip_range"], "method.adv_clip_max": s["adv_clip_max"],
        "method.advantages.per_prompt": False,
        # one sampling batch per evaluation (before and after training, untimed); no KL-to-base in the epochs
        "eval.samples": s["sample_batch"], "eval.freq": 0, "eval.kl_samples": 0, "eval.diversity_prompts": 0,
    }


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Each side's medians over epochs 2..N of all its runs, cores busy, peak RSS, and the epoch ratio.

    ``runs[side]`` holds that side's runs, each ``{"epochs": [{"epoch_s", "sample_s", "train_s", "cpu_s",
    "wall_s"}, ...], "peak_rss_mb"}``; ``cpu_s`` is the process CPU time over the ``wall_s`` seconds it was
    measured in. A side without runs reports None.
    """
    result = {}
    for side in SIDES:
        measured = [epoch for run in runs.get(side, []) for epoch in run["epochs"][1:]]
        for key in ("epoch_s", "sample_s", "train_s"):
            result[f"{side}_{key}"] = statistics.median(e[key] for e in measured) if measured else None
        result[f"{side}_cores_busy"] = (sum(e["cpu_s"] for e in measured) / sum(e["wall_s"] for e in measured)
                                        if measured else None)
        result[f"{side}_peak_rss_mb"] = max((run["peak_rss_mb"] for run in runs.get(side, [])), default=None)
    both = result["diffalign_epoch_s"] is not None and result["trl_epoch_s"] is not None
    ratio = result["diffalign_epoch_s"] / result["trl_epoch_s"] if both else None
    rounded = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
    return {"ratio_diffalign_to_trl": None if ratio is None else round(ratio, 4), **rounded}


# ---- set-up (the project's environment) ---------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[bench_vs_trl] {message}", file=sys.stderr, flush=True)


def build_pipeline(seed: int):
    """The tiny benchmark pipeline: diffalign's tiny pipeline with the :data:`TINY_UNET` UNet, seeded."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffalign.models.tiny import build_tiny_pipeline

    base = build_tiny_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
    return StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                                   scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def pipeline_folder(model: str, seed: int, cache: Path) -> Path:
    """The pipeline folder both sides load: the tiny one (saved under ``cache`` on first use), ShapesWorld's
    shipped folder, or ``model`` itself."""
    from diffalign.models.loading import missing_pipeline_files
    from diffalign.models.shapes import base_model_path

    if model == "shapes":
        return base_model_path()
    if model != "tiny":
        path = Path(model).expanduser()
        if missing_pipeline_files(path):
            raise ValueError(f"--model {model!r} is neither tiny, shapes nor a complete pipeline folder (missing: "
                             f"{', '.join(missing_pipeline_files(path))})")
        return path
    path = cache / f"tiny-seed{seed}"
    if missing_pipeline_files(path):
        _log(f"building the tiny pipeline (seed {seed}) in {path}")
        partial = Path(tempfile.mkdtemp(prefix="tiny-", dir=cache))
        build_pipeline(seed).save_pretrained(partial)
        if path.exists():  # an incomplete folder from an interrupted build
            shutil.rmtree(path)
        partial.rename(path)
    return path


def trl_requirements() -> list[str]:
    """TRL's environment: trl 0.23.1 and this environment's torch (without its local label) and
    :data:`PINNED_PACKAGES` versions."""
    from importlib.metadata import version

    return [f"torch=={version('torch').split('+')[0]}", f"trl=={TRL_VERSION}",
            *(f"{name}=={version(name)}" for name in PINNED_PACKAGES)]


def _installed(python: Path) -> dict[str, str] | None:
    """Distribution name (lower case) → version in the environment of ``python`` (None when it does not run)."""
    code = ("import json; from importlib.metadata import distributions; "
            "print(json.dumps({d.metadata['Name'].lower(): d.version for d in distributions()}))")
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return json.loads(done.stdout)


def ensure_trl_venv(venv: Path) -> Path:
    """The python of TRL's own virtual environment at ``venv``, made and installed first when it lacks a pinned
    version (torch alone first, then everything with torch pinned again)."""
    python = venv / "bin" / "python"
    requirements = trl_requirements()
    have = _installed(python) if python.exists() else None
    if have is not None and all(have.get(name, "").split("+")[0] == version
                                for name, version in (r.split("==") for r in requirements)):
        return python
    if not python.exists():
        _log(f"creating TRL's virtual environment in {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=sys.stderr)
    _log(f"installing {' '.join(requirements)} into {venv}")
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, requirements[0]], check=True, stdout=sys.stderr)
    subprocess.run([*pip, *requirements], check=True, stdout=sys.stderr)
    return python


class WorkerFailed(RuntimeError):
    """A worker process exited with an error (its output went to stderr)."""


def run_worker(side: str, python: Path, spec: dict, folder: Path) -> dict:
    """Runs one side's worker process on ``spec`` and returns what it wrote (its epochs, peak RSS, versions)."""
    spec = {**spec, "out": str(folder / f"{side}.json"), "run_dir": str(folder / "run")}
    (folder / "spec.json").write_text(json.dumps(spec))
    boot = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import bench_vs_trl as b; " \
           "b.worker(sys.argv[1], sys.argv[2])"
    threads = str(spec["settings"]["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # the worker's stdout (libraries' chatter) joins this process's stderr: stdout carries only the result
    done = subprocess.run([str(python), "-c", boot, side, str(folder / "spec.json")], env=env, stdout=sys.stderr)
    if done.returncode != 0:
        raise WorkerFailed(f"the {side} worker exited with status {done.returncode} (its output is above)")
    return json.loads(Path(spec["out"]).read_text())


def main(args: Args) -> dict:
    import torch

    from diffalign import prompts
    from diffalign.models.loading import cache_dir

    s = settings(args)
    cache = cache_dir() / "bench_vs_trl"
    cache.mkdir(parents=True, exist_ok=True)
    folder = pipeline_folder(args.model, args.seed, cache)
    trl_python = ensure_trl_venv(Path(args.trl_venv).expanduser() if args.trl_venv else cache / "venv-trl")
    pool = prompts.get(s["prompts"]).draw(SAMPLES_PER_EPOCH * args.epochs, torch.Generator().manual_seed(args.seed))
    spec = {"settings": s, "pipeline": str(folder), "prompt_pool": pool}
    pythons = {"diffalign": Path(sys.executable), "trl": trl_python}
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    errors: dict[str, str] = {}
    for round_ in range(args.rounds):
        for side in SIDES:
            if side in errors:
                continue
            _log(f"round {round_ + 1}/{args.rounds}: {side}, {args.epochs} epochs")
            with tempfile.TemporaryDirectory(prefix=f"bench-vs-trl-{side}-") as tmp:
                try:
                    runs[side].append(run_worker(side, pythons[side], spec, Path(tmp)))
                except WorkerFailed as error:
                    if side == "diffalign":
                        raise
                    errors[side] = str(error)  # e.g. a model TRL's pipeline cannot run: reported, not fatal
            _log(f"{side}: epochs {[round(e['epoch_s'], 2) for e in runs[side][-1]['epochs']]} s"
                 if side not in errors else f"{side} failed: {errors[side]}")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    return {
        **summarise(runs),
        "model": args.model, "pipeline": str(folder),
        "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 3),
        "latent_shape": [unet.config.in_channels, unet.config.sample_size, unet.config.sample_size],
        **({"trl_error": errors["trl"]} if "trl" in errors else {}),
        "settings": s,
        "versions": {side: runs[side][0]["versions"] for side in SIDES if runs[side]},
        "runs": {side: [[{k: round(v, 4) for k, v in e.items()} for e in run["epochs"]] for run in runs[side]]
                 for side in SIDES},
    }


# ---- workers (each in its own process and environment) -----------------------------------------------------


def worker(side: str, spec_path: str) -> None:
    """Entry point of a worker process: runs ``side``'s epochs and writes them with the peak RSS to spec["out"]."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["settings"]["threads"])
    epochs, versions = (_diffalign_epochs if side == "diffalign" else _trl_epochs)(spec)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    Path(spec["out"]).write_text(json.dumps({"epochs": epochs, "peak_rss_mb": peak_rss_mb, "versions": versions}))


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import version

    return {"python": sys.version.split()[0], **{name: version(name) for name in names}}


def _diffalign_epochs(spec: dict) -> tuple[list[dict], dict]:
    """diffalign's online loop (``train``) on the settings; the epoch, sampling and training seconds are the loop's
    own ``time/*`` metrics. The CPU time of each epoch is read around it by wrapping the loop's first
    (``collect``) and last (``instruments``) calls of an epoch."""
    from diffalign.config import preset, replace
    from diffalign.train import loop
    from diffalign.train.run import RunFolder

    s = spec["settings"]
    config = replace(preset("ddpo-tiny"), run_dir=spec["run_dir"],
                     **{**diffalign_overrides(s), "model.name": spec["pipeline"]})
    marks: list[list[float]] = []
    collect, instruments = loop.collect, loop.instruments

    def timed_collect(*args, **kwargs):
        marks.append([time.perf_counter(), time.process_time()])
        return collect(*args, **kwargs)

    def timed_instruments(*args, **kwargs):
        out = instruments(*args, **kwargs)
        marks[-1] += [time.perf_counter(), time.process_time()]
        return out

    loop.collect, loop.instruments = timed_collect, timed_instruments
    try:
        result = loop.train(config)
    finally:
        loop.collect, loop.instruments = collect, instruments
    records = RunFolder(result.run_dir).metrics()
    if [r["global_step"] for r in records] != list(range(1, len(records) + 1)):
        raise RuntimeError(f"diffalign took {[r['global_step'] for r in records]} optimizer steps after each epoch, "
                           "not one per epoch")
    epochs = [{"epoch_s": r["time/epoch_s"], "sample_s": r["time/sample_s"], "train_s": r["time/train_s"],
               "cpu_s": cpu_end - cpu_start, "wall_s": wall_end - wall_start}
              for r, (wall_start, cpu_start, wall_end, cpu_end) in zip(records, marks, strict=True)]
    return epochs, _versions("diffalign", "torch", "diffusers", "transformers", "accelerate", "peft")


def jpeg_compressibility(images, prompts, metadata):
    """TRL's reward function: −(JPEG size in kB) of images [B, 3, H, W] in [0, 1], as diffalign's
    ``jpeg_compressibility``: uint8 by ×255, round and clamp, quality-95 JPEG, bytes / 1000."""
    import torch
    from PIL import Image

    arrays = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000)
    return -torch.tensor(sizes, dtype=torch.float32), {}


def _trl_epochs(spec: dict) -> tuple[list[dict], dict]:
    """TRL's ``DDPOTrainer.step`` per epoch on ``DefaultDDPOStableDiffusionPipeline`` (LoRA r 4, α 4 on
    to_q/k/v/out.0, its only LoRA setting); sampling and training timed by wrapping ``_generate_samples`` and
    ``_train_batched_samples`` on the trainer instance."""
    import warnings

    from accelerate import PartialState

    PartialState()  # TRL's pipeline logs through accelerate's logger, which needs the state made first
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    s = spec["settings"]
    pool = itertools.cycle(spec["prompt_pool"])  # one prompt per sample, in the pool's order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        trainer = DDPOTrainer(
            DDPOConfig(**trl_config(s), project_kwargs={"project_dir": spec["run_dir"]}),
            jpeg_compressibility, lambda: (next(pool), {}),
            DefaultDDPOStableDiffusionPipeline(spec["pipeline"], use_lora=True),
        )
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    spent = {"sample_s": 0.0, "train_s": 0.0}

    def timed(key, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
        return wrapper

    trainer._generate_samples = timed("sample_s", trainer._generate_samples)
    trainer._train_batched_samples = timed("train_s", trainer._train_batched_samples)
    epochs, global_step = [], 0
    for epoch in range(s["epochs"]):
        spent.update(sample_s=0.0, train_s=0.0)
        wall, cpu = time.perf_counter(), time.process_time()
        global_step = trainer.step(epoch, global_step)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if global_step != epoch + 1:
            raise RuntimeError(f"TRL took {global_step} optimizer steps in {epoch + 1} epochs, not one per epoch")
        epochs.append({"epoch_s": wall, **spent, "cpu_s": cpu, "wall_s": wall})
        print(f"[bench_vs_trl] trl epoch {epoch + 1}: {wall:.2f} s", file=sys.stderr, flush=True)
    return epochs, _versions("trl", "torch", "diffusers", "transformers", "accelerate", "peft")


if __name__ == "__main__":
    import tyro

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(main(tyro.cli(Args))))
