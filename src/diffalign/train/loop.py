"""The online loop: collect → reward → targets → minibatches → loss → backward → step → log → checkpoint.

One explicit loop for every on-policy method; the method (``diffalign.algorithms``) says how it collects, what
its targets are, how its batch splits and what its loss is. The loop owns accelerate (devices, processes, mixed
precision), gathering across processes, gradient accumulation, clipping, checkpoints, logging and the calls to
evaluation, and never names a method. Every random draw derives from (seed, epoch, index), so samples are the
same at any batch size or process count, and a resumed run continues bit-identically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from diffalign import prompts as prompt_sources
from diffalign.algorithms import Algorithm, Minibatching, build
from diffalign.algorithms.advantages import zero_advantage_fraction
from diffalign.config import Config
from diffalign.evaluate import EvalSet, RunSummary, evaluate_policy, kl_to_base, weight_drift
from diffalign.models import Policy, add_lora, load_policy
from diffalign.rewards import Reward, RewardOutput
from diffalign.rollout import Rollout, derive_seed, sample_seed, transitions
from diffalign.train.checkpoint import (TrainerState, check_disk_space, checkpoint_bytes, checkpoint_folders,
                                        latest_checkpoint, load_checkpoint, save_checkpoint)
from diffalign.train.run import RunFolder

PROMPT_STREAM, SHUFFLE_STREAM, EVAL_STREAM, KL_STREAM, TARGET_STREAM = 1, 2, 3, 10, 11
#: Largest |r − 1| of the importance ratio on an epoch's first optimizer step (no update since sampling yet) that
#: fp32 training accepts without a warning: log-probs recomputed for training must match the sampler's.
FIRST_RATIO_TOLERANCE = 1e-4

log = logging.getLogger("diffalign.train")


def build_policy(config: Config, accelerator: Accelerator) -> Policy:
    """Loads the model, adds LoRA (or unfreezes the UNet) and moves it to the device."""
    policy = load_policy(config.model.name, config.model.revision)
    if config.model.use_lora:
        add_lora(policy.unet, config.model.lora_rank, config.model.lora_alpha, config.model.lora_target_modules)
    else:
        policy.unet.requires_grad_(True)
    frozen_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.model.mixed_precision]
    policy.to(accelerator.device)
    if frozen_dtype != torch.float32:
        policy.vae.to(dtype=frozen_dtype)
        policy.text_encoder.to(dtype=frozen_dtype)
    return policy


def epoch_prompts_and_seeds(config: Config, source, epoch: int, accelerator: Accelerator):
    """This process's prompts and noise seeds for ``epoch`` (a slice of the epoch's global draw).

    The epoch draws ``total / samples_per_prompt`` prompts and repeats each ``samples_per_prompt`` times in a row;
    every sample keeps its own noise seed. Groups never straddle processes (``samples_per_prompt`` divides the
    samples per device).
    """
    per_device, group = config.sample.samples_per_device, config.sample.samples_per_prompt
    total = per_device * accelerator.num_processes
    generator = torch.Generator().manual_seed(derive_seed(config.seed, epoch, 0, PROMPT_STREAM))
    everything = [prompt for prompt in source.draw(total // group, generator) for _ in range(group)]
    start = accelerator.process_index * per_device
    indices = range(start, start + per_device)
    return [everything[i] for i in indices], [sample_seed(config.seed, epoch, i) for i in indices]


def reward_worker() -> ThreadPoolExecutor:
    """The thread rewards are scored in while the next batch samples. Its torch ops run on one CPU thread: with the
    default count the worker starts a second OpenMP team beside the sampler's, and the two keep competing for the
    cores (on 2 cores the denoiser ran 1.5× slower in the main thread once a reward had run in the worker; the
    count is per thread, so the main thread keeps its own)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward", initializer=torch.set_num_threads,
                              initargs=(1,))


def _score(algorithm: Algorithm, policy: Policy, reward: Reward, rollout: Rollout) -> RewardOutput:
    with torch.no_grad():
        return algorithm.score(policy, reward, rollout)


def collect(config: Config, algorithm: Algorithm, policy: Policy, reward: Reward, prompts: list[str],
            seeds: list[int], executor: ThreadPoolExecutor | None = None) -> tuple[Rollout, dict, dict]:
    """Collects this epoch's trajectories batch by batch (the method's way) and scores them.

    With an ``executor`` each batch's reward runs in a worker thread while the next batch samples (as DDPO
    does); ``time/reward_wait_s`` is the reward time left after sampling ends. Returns the rollout with its
    rewards (``[B]``, or per step ``[B, T]`` as the method scores them), the timings and the members' values
    ``[B]`` of a composite reward (empty otherwise).
    """
    policy.unet.eval()
    batch, parts, pending = config.sample.batch_size_per_device, [], []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        part = algorithm.collect(policy, prompts[i : i + batch], seeds[i : i + batch])
        parts.append(part)
        pending.append(executor.submit(_score, algorithm, policy, reward, part) if executor
                       else _score(algorithm, policy, reward, part))
    sampled = time.perf_counter()
    outputs = [item.result() if executor else item for item in pending]
    rollout = Rollout.cat(parts).with_rewards(torch.cat([o.scores for o in outputs]))
    components = {name: torch.cat([o.components[name] for o in outputs]) for name in outputs[0].components}
    timings = {"time/sample_s": sampled - start, "time/reward_wait_s": time.perf_counter() - sampled}
    return rollout, timings, components


def gathered_means(values: dict[str, torch.Tensor], accelerator: Accelerator, prefix: str) -> dict[str, float]:
    """``{prefix + name: mean over all processes}`` of per-sample values ``[B_local]``."""
    return {f"{prefix}{name}": accelerator.gather(v.to(accelerator.device)).float().mean().item()
            for name, v in values.items()}


def compute_targets(algorithm: Algorithm, rollout: Rollout, accelerator: Accelerator,
                    generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Gathers rewards and prompts across processes, asks the method for its targets, returns this process's.

    ``reward/*`` describe the final images; per-step rewards ``[B, T]`` also log ``reward/first_step_mean``."""
    rewards_all = accelerator.gather(rollout.rewards.to(accelerator.device)).cpu()
    prompts_all = gather_object(rollout.prompts) if accelerator.num_processes > 1 else rollout.prompts
    targets = algorithm.targets(rewards_all, prompts_all, generator)
    local = targets.reshape(accelerator.num_processes, -1, *targets.shape[1:])[accelerator.process_index]
    final = rewards_all if rewards_all.ndim == 1 else rewards_all[:, -1]
    metrics = {"reward/mean": final.mean().item(), "reward/std": final.std(unbiased=False).item(),
               "reward/min": final.min().item(), "reward/max": final.max().item(),
               "train/zero_advantage_groups": zero_advantage_fraction(targets, prompts_all)}
    if rewards_all.ndim == 2:
        metrics["reward/first_step_mean"] = rewards_all[:, 0].mean().item()
    return local.to(accelerator.device), metrics


def instruments(config: Config, policy: Policy, rollout: Rollout, accelerator: Accelerator,
                epoch: int) -> dict[str, float]:
    """Always-on measures of how far training moved the policy: ``train/weight_drift`` (‖ΔW‖/‖W‖) and, when the
    sampler is stochastic, ``kl/to_base`` (Σ_t KL to the base model along the first ``eval.kl_samples`` of this
    epoch's trajectories, estimated on ``eval.kl_steps`` random steps, averaged over processes)."""
    metrics = {"train/weight_drift": weight_drift(policy)}
    settings = config.sample.settings()
    if config.eval.kl_samples and settings.eta > 0:
        generator = torch.Generator().manual_seed(derive_seed(config.seed, epoch, 0, KL_STREAM))
        steps = torch.randperm(rollout.num_steps, generator=generator)[: config.eval.kl_steps]
        kl = kl_to_base(policy, rollout.index(slice(0, config.eval.kl_samples)), settings, steps)
        metrics["kl/to_base"] = accelerator.gather(kl.to(accelerator.device)).float().mean().item()
    return metrics


def step_gradient_norms(config: Config, algorithm: Algorithm, policy: Policy, rollout: Rollout,
                        targets: torch.Tensor, accelerator: Accelerator) -> dict[str, float]:
    """``grad_norm/step_{j:02d}`` (``eval.step_grad_norms``): for every denoising step j, the norm of the gradient of
    the method's loss over the epoch's transitions at step j (averaged over processes) with respect to the trained
    denoiser weights, before the epoch's update. Costs one more forward and backward pass per transition; leaves
    no gradient behind. Which steps carry the gradient depends on the model's parameterisation (an
    x0-prediction model's last two steps carry almost all of it); ``benchmarks/bench_step_gradients.py`` adds the
    split-half cosine."""
    weights = [p for p in policy.unet.parameters() if p.requires_grad]
    everything = trainable_parameters(policy, algorithm)
    scale = 1.0 if accelerator.scaler is None else accelerator.scaler.get_scale()  # fp16: the loss is scaled
    size, rows = config.train.batch_size_per_device, torch.arange(len(rollout))
    policy.unet.train()
    norms = {}
    for j in range(rollout.num_steps):
        for start in range(0, len(rollout), size):
            chunk = rows[start : start + size]
            batch = transitions(rollout, chunk, torch.full_like(chunk, j), targets)
            with accelerator.no_sync(policy.unet), accelerator.autocast():
                loss, _ = algorithm.loss(policy, batch)
            accelerator.backward(loss * (len(chunk) / len(rollout)))
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in weights])
        norms[f"grad_norm/step_{j:02d}"] = accelerator.reduce(flat, reduction="mean").norm().item() / scale
        for p in everything:
            p.grad = None
    return norms


def trainable_parameters(policy: Policy, algorithm: Algorithm) -> list[torch.nn.Parameter]:
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    return params + [p for extra in algorithm.modules.values() for p in extra.module.parameters() if p.requires_grad]


def skip_nonfinite(config: Config, algorithm: Algorithm, epoch: int, values: dict[str, float]) -> bool:
    """Whether the optimizer step whose ``values`` (loss, gradient norm) these are must be skipped: False when all
    are finite; True when one is NaN or infinite and ``train.skip_nonfinite_steps`` is set; else raises
    FloatingPointError naming the epoch, the method and the metric."""
    bad = [(name, value) for name, value in values.items() if not math.isfinite(value)]
    if not bad or config.train.skip_nonfinite_steps:
        return bool(bad)
    name, value = bad[0]
    raise FloatingPointError(
        f"epoch {epoch}: {algorithm.name}'s {name} is {value}; the optimizer step was not taken. Lower "
        "train.learning_rate or train.max_grad_norm and check the reward, or set train.skip_nonfinite_steps=True "
        "(--train.skip-nonfinite-steps) to skip such steps (counted as train/skipped_steps)")


def gradient_step(config: Config, algorithm: Algorithm, policy: Policy, optimizer, params: list,
                  group: list, accelerator: Accelerator, totals: dict[str, float], epoch: int,
                  largest: dict[str, float] | None = None) -> float | None:
    """One optimizer step on the method's loss averaged over the micro-batches ``group`` (gradients synchronised
    across processes on the last one only), clipped; adds the micro-batches' metrics to ``totals`` (and, given
    ``largest``, the largest value of each of its keys over the micro-batches to it) and returns the gradient norm
    before clipping. A NaN or infinite loss (on any process) or gradient norm stops the run before
    the step (:func:`skip_nonfinite`), or with ``train.skip_nonfinite_steps`` zeroes the gradients, drops the
    metrics and returns None. Under fp16 the loss scaler owns infinite gradients (it skips those steps itself)."""
    losses, step_metrics = [], {}
    for k, batch in enumerate(group):
        synced = contextlib.nullcontext() if k == len(group) - 1 else accelerator.no_sync(policy.unet)
        with synced:
            with accelerator.autocast():
                loss, metrics = algorithm.loss(policy, batch)
            accelerator.backward(loss / len(group))
        losses.append(loss.detach().float())
        for name, value in metrics.items():
            step_metrics[name] = step_metrics.get(name, 0.0) + float(value)
            if largest is not None and name in largest:
                largest[name] = max(largest[name], float(value))
    grad_norm = accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
    values = {"loss": accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()}
    if accelerator.scaler is None:
        values["policy/grad_norm"] = float(grad_norm)
    if skip_nonfinite(config, algorithm, epoch, values):
        optimizer.zero_grad()
        if accelerator.scaler is not None:  # forget the unscale clip_grad_norm_ did, as a skipped fp16 step would
            accelerator.scaler.update()
        return None
    optimizer.step()
    optimizer.zero_grad()
    for name, value in step_metrics.items():
        totals[name] = totals.get(name, 0.0) + value
    return float(grad_norm)


def first_ratio_check(config: Config, largest: dict[str, float], epoch: int) -> dict[str, float]:
    """``policy/first_step_ratio_error``: the largest |r − 1| of the importance ratio over the epoch's first
    optimizer step, where no update has happened since sampling (for methods whose loss reports
    ``policy/ratio_max_dev``). It is 0 up to rounding in fp32, and is logged with a warning above
    :data:`FIRST_RATIO_TOLERANCE` there; under fp16/bf16 it measures the drift autocast adds to the ratio."""
    error = largest.get("policy/ratio_max_dev", -1.0)
    if error < 0:
        return {}
    if config.model.mixed_precision == "no" and error > FIRST_RATIO_TOLERANCE:
        log.warning("epoch %d: the importance ratio before any update is off 1 by %.3g in fp32 (tolerance %g): the "
                    "log-probs recomputed for training do not match the sampler's (dropout in the model? "
                    "nondeterministic or TF32 kernels?)", epoch, error, FIRST_RATIO_TOLERANCE)
    return {"policy/first_step_ratio_error": error}


def train_epoch(config: Config, algorithm: Algorithm, policy: Policy, optimizer, rollout: Rollout,
                targets: torch.Tensor, accelerator: Accelerator, epoch: int) -> tuple[dict, int]:
    """One pass of the method's minibatches over the epoch's rollout; returns averaged metrics and the number of
    optimizer steps. Each optimizer step is the method's own (:meth:`Algorithm.update`, when it takes one) or
    :func:`gradient_step`; either is checked for a NaN or infinite loss or gradient norm (:func:`skip_nonfinite`),
    and ``train/skipped_steps`` counts the steps skipped for one. The first step's ratio is checked
    (:func:`first_ratio_check`)."""
    policy.unet.train()
    params = trainable_parameters(policy, algorithm)
    plan = Minibatching(config.train.batch_size_per_device, config.train.gradient_accumulation_steps)

    def generator_for(key: int) -> torch.Generator:
        key = key * accelerator.num_processes + accelerator.process_index
        return torch.Generator().manual_seed(derive_seed(config.seed, epoch, key, SHUFFLE_STREAM))

    def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(value, reduction="mean")

    totals: dict[str, float] = {}
    per_step: dict[str, float] = {}
    count = steps = skipped = 0
    first: dict[str, float] = {}
    for index, group in enumerate(algorithm.minibatches(rollout, targets, plan, generator_for)):
        with accelerator.no_sync(policy.unet), accelerator.autocast():
            stepped = algorithm.update(policy, params, group, mean_over_processes)
        if stepped is None:
            largest = {"policy/ratio_max_dev": -1.0} if index == 0 else None
            grad_norm = gradient_step(config, algorithm, policy, optimizer, params, group, accelerator, totals, epoch,
                                      largest)
            first = largest or first
            stepped = None if grad_norm is None else {"policy/grad_norm": grad_norm}
            count += 0 if grad_norm is None else len(group)
        elif skip_nonfinite(config, algorithm, epoch, {k: stepped[k] for k in ("policy/loss", "policy/grad_norm")
                                                       if k in stepped}):
            stepped = None  # the method's own step does not apply a non-finite update (TRPO's update ensures it)
        if stepped is None:
            skipped += 1
            continue
        steps += 1
        for name, value in {**stepped, **algorithm.after_optimizer_step()}.items():
            per_step[name] = per_step.get(name, 0.0) + value
    averaged = {name: value / count for name, value in totals.items()}
    averaged.update({name: value / steps for name, value in per_step.items()})
    averaged["train/skipped_steps"] = float(skipped)
    averaged.update(first_ratio_check(config, first, epoch))
    return averaged, steps


def evaluation_sets(config: Config, source) -> list[EvalSet]:
    """Fixed evaluation sets: ``train`` from the training source, ``heldout`` from ``config.eval.prompts`` and,
    with ``eval.diversity_prompts``, ``diversity`` (training prompts, each ``eval.diversity_samples`` times)."""
    sources = {"train": source}
    if config.eval.prompts is not None:
        sources["heldout"] = prompt_sources.get(config.eval.prompts)
    sets = []
    for k, (name, s) in enumerate(sources.items()):
        prompts = s.draw(config.eval.samples, torch.Generator().manual_seed(derive_seed(config.seed, 0, k, EVAL_STREAM)))
        seeds = [derive_seed(config.seed, 0, i, EVAL_STREAM + 1 + k) for i in range(len(prompts))]
        sets.append(EvalSet(name, prompts, seeds))
    if config.eval.diversity_prompts:
        k, n = len(sources), config.eval.diversity_samples
        drawn = source.draw(config.eval.diversity_prompts,
                            torch.Generator().manual_seed(derive_seed(config.seed, 0, k, EVAL_STREAM)))
        prompts = [p for p in drawn for _ in range(n)]
        sets.append(EvalSet("diversity", prompts,
                            [derive_seed(config.seed, 0, i, EVAL_STREAM + 1 + k) for i in range(len(prompts))]))
    return sets


def evaluate(config: Config, policy: Policy, judges: dict[str, Reward], sets: list[EvalSet]):
    """:func:`~diffalign.evaluate.evaluate_policy` with the training sampler's settings, on the main process only
    (the unwrapped UNet: no collective calls)."""
    wrapped, policy.unet = policy.unet, policy.base_unet
    policy.unet.eval()
    try:
        diversity = [s.name for s in sets if s.name == "diversity"]
        return evaluate_policy(policy, sets, config.sample.settings(), judges, config.sample.batch_size_per_device,
                               diversity_sets=diversity)
    finally:
        policy.unet = wrapped


def _over_budget(spent_s: float, budget_s: float, accelerator: Accelerator) -> bool:
    """Whether the main process has spent its time budget (every process stops at the same epoch)."""
    flag = torch.tensor([float(spent_s >= budget_s) if accelerator.is_main_process else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def default_run_dir(config: Config) -> Path:
    return Path("runs") / f"{config.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


@dataclass
class TrainResult:
    """What a finished run leaves in memory: its folder, the trained policy and the method (with its state)."""

    run_dir: Path
    policy: Policy
    algorithm: Algorithm


def _optimizer(config: Config, policy: Policy, algorithm: Algorithm) -> torch.optim.Optimizer:
    """AdamW over the policy's trainable weights and each extra module at its own learning rate."""
    t = config.train
    groups = [{"params": [p for p in policy.unet.parameters() if p.requires_grad], "lr": t.learning_rate}]
    groups += [{"params": [p for p in extra.module.parameters() if p.requires_grad], "lr": extra.learning_rate}
               for extra in algorithm.modules.values()]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                             weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)


def _accelerator(config: Config, run_path: Path) -> Accelerator:
    try:
        return Accelerator(mixed_precision=config.model.mixed_precision,
                           log_with=None if config.log_with == "none" else config.log_with, project_dir=str(run_path))
    except ValueError as error:
        if "already been initialized" not in str(error):
            raise
        raise ValueError(f"model.mixed_precision={config.model.mixed_precision!r}: this process already set up "
                         "accelerate with another precision, which it cannot change; run this training in a new "
                         "process") from None


@contextlib.contextmanager
def _removed_unless_resumable(run_path: Path, accelerator: Accelerator):
    """On an error, deletes the run folder this run created if it holds no complete checkpoint yet (a folder
    nothing could resume from); a folder that existed before is left as it was."""
    created = accelerator.is_main_process and not run_path.exists()
    try:
        yield
    except Exception:
        if created and run_path.exists() and not checkpoint_folders(run_path / "checkpoints"):
            log.error("the run failed before its first checkpoint: deleting %s", run_path)
            shutil.rmtree(run_path, ignore_errors=True)
        raise


def train(config: Config) -> TrainResult:
    """Runs the online loop described in the module docstring. A run that fails before its first checkpoint
    leaves no run folder behind."""
    config.check()
    run_path = Path(config.run_dir) if config.run_dir else default_run_dir(config)
    accelerator = _accelerator(config, run_path)
    with _removed_unless_resumable(run_path, accelerator):
        return _train(config, run_path, accelerator)


def _train(config: Config, run_path: Path, accelerator: Accelerator) -> TrainResult:
    set_seed(config.seed)
    policy = build_policy(config, accelerator)
    if not config.model.use_lora:
        policy.keep_reference()  # the base model that drift and KL are measured against
    reward, gold = config.reward.build(accelerator.device)
    source = prompt_sources.get(config.prompts)
    algorithm = build(config.method, config.sample.settings(), reward)
    algorithm.attach(policy)
    for extra in algorithm.modules.values():
        extra.module.to(accelerator.device)
    optimizer = _optimizer(config, policy, algorithm)
    policy.unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    for extra in algorithm.modules.values():
        extra.module = accelerator.prepare(extra.module)
    unwrapped = {name: accelerator.unwrap_model(extra.module) for name, extra in algorithm.modules.items()}
    executor = reward_worker() if config.reward.async_scoring else None

    state = TrainerState()
    if config.resume:
        state = load_checkpoint(latest_checkpoint(config.resume, fallback=config.resume_fallback),
                                policy.base_unet, unwrapped, optimizer)
        algorithm.load_state_dict(state.algorithm)
    check_disk_space(run_path, checkpoint_bytes([policy.base_unet, *unwrapped.values()], optimizer))
    run = RunFolder(run_path) if accelerator.is_main_process else None
    eval_sets = evaluation_sets(config, source)
    judges = {"reward": reward, **({"gold": gold} if gold is not None else {})}
    if run is not None:
        run.write_config(config)
        run.truncate_metrics(state.epochs_done)
    if config.log_with != "none":
        accelerator.init_trackers("diffalign", config=_flat(config.to_dict()))

    if state.epochs_done == 0 and accelerator.is_main_process:
        base = evaluate(config, policy, judges, eval_sets)
        state.base_evaluation = base.metrics
        run.save_samples(0, base.rollouts["train"].images, eval_sets[0].prompts, label="before")
    budget_s = None if config.time_budget_minutes is None else 60 * config.time_budget_minutes
    spent_s = 0.0
    progress = tqdm(range(state.epochs_done, config.epochs), initial=state.epochs_done, total=config.epochs,
                    desc=f"{config.algorithm} {config.preset}", disable=not accelerator.is_main_process)
    for epoch in progress:
        prompts, seeds = epoch_prompts_and_seeds(config, source, epoch, accelerator)
        start = time.perf_counter()
        rollout, timings, components = collect(config, algorithm, policy, reward, prompts, seeds, executor)
        generator = torch.Generator().manual_seed(derive_seed(config.seed, epoch, 0, TARGET_STREAM))
        targets, reward_metrics = compute_targets(algorithm, rollout, accelerator, generator)
        reward_metrics.update(gathered_means(components, accelerator, "reward/components/"))
        if gold is not None:
            with torch.no_grad():
                reward_metrics.update(gathered_means({"gold_mean": gold(rollout.images, rollout.prompts)},
                                                     accelerator, "reward/"))
        step_norms = {}
        if config.eval.step_grad_norms:
            step_norms = step_gradient_norms(config, algorithm, policy, rollout, targets, accelerator)
        start_train = time.perf_counter()
        train_metrics, steps = train_epoch(config, algorithm, policy, optimizer, rollout, targets, accelerator,
                                           epoch)
        train_s = time.perf_counter() - start_train
        train_metrics.update(instruments(config, policy, rollout, accelerator, epoch))
        state.global_step += steps
        state.epochs_done = epoch + 1
        record = {"epoch": epoch, "global_step": state.global_step, **reward_metrics, **train_metrics, **step_norms,
                  **timings, "time/train_s": train_s, "time/epoch_s": time.perf_counter() - start}
        if config.eval.freq and state.epochs_done % config.eval.freq == 0 and state.epochs_done < config.epochs:
            if accelerator.is_main_process:
                record.update({f"eval/{k}": v for k, v in evaluate(config, policy, judges, eval_sets).metrics.items()})
        record = {k: (float(f"{v:.8g}") if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        progress.set_postfix(reward=f"{record['reward/mean']:.4g}", kl_to_base=f"{record.get('kl/to_base', 0):.2g}")
        if config.log_with != "none":
            accelerator.log(record, step=epoch)
        if run is not None:
            run.log(record)
        spent_s += record["time/epoch_s"]
        stop = budget_s is not None and _over_budget(spent_s, budget_s, accelerator)
        if state.epochs_done % config.save_freq == 0 or state.epochs_done == config.epochs or stop:
            state.algorithm = algorithm.state_dict()
            if accelerator.is_main_process:
                save_checkpoint(run.path / "checkpoints" / str(state.epochs_done), policy.base_unet, unwrapped,
                                optimizer, state, keep_last=config.keep_last)
        accelerator.wait_for_everyone()
        if stop:
            break

    if accelerator.is_main_process:
        final = evaluate(config, policy, judges, eval_sets)
        run.save_samples(state.epochs_done, final.rollouts["train"].images, eval_sets[0].prompts, label="after")
        summary = RunSummary(preset=config.preset, algorithm=config.algorithm, reward=config.reward.name,
                             model=config.model.name, epochs=state.epochs_done, global_step=state.global_step,
                             final=final.metrics, base=state.base_evaluation)
        run.finish(summary, f"diffalign {config.algorithm} — {config.preset} — {config.reward.name}")
    accelerator.end_training()
    if executor is not None:
        executor.shutdown()
    return TrainResult(run_path, policy, algorithm)
