"""The online loop: collect → reward → advantages → inner epochs → loss → backward → step → log → checkpoint.

One explicit loop for every on-policy method; the algorithm supplies the loss. accelerate owns devices,
processes, mixed precision and gradient accumulation. Every random draw derives from (seed, epoch, index), so
samples are the same at any batch size or process count, and a resumed run continues bit-identically.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from diffalign import prompts as prompt_sources
from diffalign import rewards
from diffalign.algorithms.ddpo import DDPO
from diffalign.config import Config
from diffalign.models import Policy, add_lora, load_policy
from diffalign.rollout import Rollout, derive_seed, sample, sample_seed, transitions
from diffalign.train.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from diffalign.train.run import RunFolder
from diffalign.train.stats import PerPromptStatTracker, batch_advantages

PROMPT_STREAM, SHUFFLE_STREAM, EVAL_STREAM = 1, 2, 3


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


def _score(reward, rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's rewards and, for composite rewards, each member's values (read in the same thread)."""
    with torch.no_grad():
        rewards = reward(rollout.images, rollout.prompts)
    return rewards, dict(getattr(reward, "last_components", {}))


def collect(config: Config, policy: Policy, reward, prompts: list[str], seeds: list[int],
            executor: ThreadPoolExecutor | None = None) -> tuple[Rollout, dict, dict[str, torch.Tensor]]:
    """Samples this epoch's trajectories batch by batch and scores them.

    With an ``executor`` each batch's reward runs in a worker thread while the next batch samples (as DDPO
    does); ``time/reward_wait_s`` is the reward time left after sampling ends. Returns the rollout, the
    timings and the members' values ``[B]`` of a composite reward (empty otherwise).
    """
    policy.unet.eval()
    batch, parts, pending = config.sample.batch_size_per_device, [], []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        part = sample(policy, prompts[i : i + batch], seeds[i : i + batch], config.sample.settings())
        parts.append(part)
        pending.append(executor.submit(_score, reward, part) if executor else _score(reward, part))
    sampled = time.perf_counter()
    scored = [item.result() if executor else item for item in pending]
    for part, (rewards, _) in zip(parts, scored):
        part.rewards = rewards
    components = {name: torch.cat([c[name] for _, c in scored]) for name in scored[0][1]}
    timings = {"time/sample_s": sampled - start, "time/reward_wait_s": time.perf_counter() - sampled}
    return Rollout.cat(parts), timings, components


def gathered_means(values: dict[str, torch.Tensor], accelerator: Accelerator, prefix: str) -> dict[str, float]:
    """``{prefix + name: mean over all processes}`` of per-sample values ``[B_local]``."""
    return {f"{prefix}{name}": accelerator.gather(v.to(accelerator.device)).float().mean().item()
            for name, v in values.items()}


def compute_advantages(config: Config, rollout: Rollout, tracker, accelerator: Accelerator) -> tuple[torch.Tensor, dict]:
    """Gathers rewards and prompts across processes, normalises, and returns this process's advantages."""
    rewards_all = accelerator.gather(rollout.rewards.to(accelerator.device)).cpu()
    prompts_all = gather_object(rollout.prompts) if accelerator.num_processes > 1 else rollout.prompts
    if tracker is not None:
        advantages = tracker.update(prompts_all, rewards_all)
    else:
        advantages = batch_advantages(rewards_all)
    local = advantages.reshape(accelerator.num_processes, -1)[accelerator.process_index]
    metrics = {"reward/mean": rewards_all.mean().item(), "reward/std": rewards_all.std(unbiased=False).item(),
               "reward/min": rewards_all.min().item(), "reward/max": rewards_all.max().item()}
    return local.to(accelerator.device), metrics


def train_epoch(config, algorithm, policy, optimizer, rollout, advantages, accelerator, epoch) -> tuple[dict, int]:
    """The inner epochs over one epoch's rollout; returns averaged metrics and the optimizer steps taken."""
    policy.unet.train()
    n, steps_per_traj = len(rollout), rollout.num_steps
    trained = config.num_train_timesteps
    settings, params = config.sample.settings(), [p for p in policy.unet.parameters() if p.requires_grad]
    totals: dict[str, float] = {}
    count = optimizer_steps = 0
    for inner in range(config.train.num_inner_epochs):
        key = inner * accelerator.num_processes + accelerator.process_index
        generator = torch.Generator().manual_seed(derive_seed(config.seed, epoch, key, SHUFFLE_STREAM))
        order = torch.randperm(n, generator=generator)
        step_order = torch.stack([torch.randperm(steps_per_traj, generator=generator) for _ in range(n)])[:, :trained]
        for first in range(0, n, config.train.batch_size_per_device):
            rows = order[first : first + config.train.batch_size_per_device]
            for j in range(trained):
                batch = transitions(rollout, rows, step_order[rows, j], advantages)
                with accelerator.accumulate(policy.unet):
                    with accelerator.autocast():
                        loss, metrics = algorithm.loss(policy, batch, settings, config.train.cfg)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        metrics["policy/grad_norm"] = accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
                        optimizer_steps += 1
                    optimizer.step()
                    optimizer.zero_grad()
                for name, value in metrics.items():
                    totals[name] = totals.get(name, 0.0) + float(value)
                count += 1
    averaged = {name: value / count for name, value in totals.items() if not name.endswith("grad_norm")}
    if "policy/grad_norm" in totals:
        averaged["policy/grad_norm"] = totals["policy/grad_norm"] / max(optimizer_steps, 1)
    return averaged, optimizer_steps


def evaluation_sets(config: Config, source) -> dict[str, list[str]]:
    """Fixed evaluation prompts: ``train`` from the training source, ``heldout`` from ``config.eval_prompts``."""
    sets = {"train": source}
    if config.eval_prompts is not None:
        sets["heldout"] = prompt_sources.get(config.eval_prompts)
    return {name: s.draw(config.eval_samples, torch.Generator().manual_seed(derive_seed(config.seed, 0, k, EVAL_STREAM)))
            for k, (name, s) in enumerate(sets.items())}


@torch.no_grad()
def evaluate(config: Config, policy: Policy, judges: dict, sets: dict[str, list[str]]) -> tuple[dict, torch.Tensor]:
    """Each judge's score (and strict accuracy, for rewards with an ``evaluate`` method) on each fixed set.

    ``judges`` maps a metric name to a reward: ``{"reward": trained-on, "gold": judged-by}``. Every call samples
    the same prompts with the same seeds and the training sampler's settings. Returns the metrics
    ``{split}_{judge}_mean`` and ``{split}_{judge}_strict_accuracy`` (``{split}_strict_accuracy`` for the
    trained-on reward) and the first set's images.
    """
    wrapped, policy.unet = policy.unet, policy.base_unet  # main process only: no collective calls
    policy.unet.eval()
    try:
        return _evaluate_sets(config, policy, judges, sets)
    finally:
        policy.unet = wrapped


def _evaluate_sets(config: Config, policy: Policy, judges: dict, sets: dict[str, list[str]]) -> tuple[dict, torch.Tensor]:
    metrics, first_images = {}, None
    batch = config.sample.batch_size_per_device
    for k, (split, prompts) in enumerate(sets.items()):
        seeds = [derive_seed(config.seed, 0, i, EVAL_STREAM + 1 + k) for i in range(len(prompts))]
        rollout = Rollout.cat([sample(policy, prompts[i : i + batch], seeds[i : i + batch], config.sample.settings())
                               for i in range(0, len(prompts), batch)])
        for name, judge in judges.items():
            strict_key = f"{split}_strict_accuracy" if name == "reward" else f"{split}_{name}_strict_accuracy"
            if hasattr(judge, "evaluate"):
                scores, strict = judge.evaluate(rollout.images, rollout.prompts)
                metrics[strict_key] = strict.float().mean().item()
            else:
                scores = judge(rollout.images, rollout.prompts)
            metrics[f"{split}_{name}_mean"] = scores.float().mean().item()
        first_images = rollout.images if first_images is None else first_images
    return metrics, first_images


def default_run_dir(config: Config) -> Path:
    return Path("runs") / f"{config.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _flat(config: Config) -> dict:
    flat = {}
    for key, value in asdict(config).items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            flat[f"{key}.{sub}".rstrip(".")] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


@dataclass
class TrainResult:
    """What a finished run leaves in memory: its folder, the trained policy and the stat tracker."""

    run_dir: Path
    policy: Policy
    stat_tracker: PerPromptStatTracker | None


def train(config: Config) -> TrainResult:
    """Runs the online loop described in the module docstring."""
    config.check()
    run_path = Path(config.run_dir) if config.run_dir else default_run_dir(config)
    trained = config.num_train_timesteps
    accelerator = Accelerator(
        mixed_precision=config.model.mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps * trained,
        log_with=None if config.log_with == "none" else config.log_with,
        project_dir=str(run_path),
    )
    set_seed(config.seed)
    policy = build_policy(config, accelerator)
    reward = rewards.get(config.reward, device=accelerator.device, **config.reward_kwargs)
    gold = (rewards.get(config.gold_reward, device=accelerator.device, **config.gold_reward_kwargs)
            if config.gold_reward else None)
    source = prompt_sources.get(config.prompts)
    algorithm = DDPO(config.ddpo)
    t = config.train
    optimizer = torch.optim.AdamW([p for p in policy.unet.parameters() if p.requires_grad], lr=t.learning_rate,
                                  betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay,
                                  eps=t.adam_epsilon)
    policy.unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    tracker = PerPromptStatTracker(t.stat_buffer_size, t.stat_min_count) if t.per_prompt_stat_tracking else None
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") if config.async_rewards else None

    state = TrainerState()
    if config.resume:
        state = load_checkpoint(latest_checkpoint(config.resume), policy.base_unet, optimizer)
        if tracker is not None and state.stat_tracker is not None:
            tracker.load_state_dict(state.stat_tracker)
    run = RunFolder(run_path) if accelerator.is_main_process else None
    eval_sets = evaluation_sets(config, source)
    judges = {"reward": reward, **({"gold": gold} if gold is not None else {})}
    if run is not None:
        run.write_config(config)
        run.truncate_metrics(state.epochs_done)
    if config.log_with != "none":
        accelerator.init_trackers("diffalign", config=_flat(config))

    if state.epochs_done == 0 and accelerator.is_main_process:
        state.extra["base"], images = evaluate(config, policy, judges, eval_sets)
        run.save_samples(0, images, eval_sets["train"])
        (run.path / "samples" / "before.png").write_bytes((run.path / "samples" / "epoch_0000.png").read_bytes())
    progress = tqdm(range(state.epochs_done, config.epochs), initial=state.epochs_done, total=config.epochs,
                    desc=f"{config.algorithm} {config.preset}", disable=not accelerator.is_main_process)
    for epoch in progress:
        prompts, seeds = epoch_prompts_and_seeds(config, source, epoch, accelerator)
        start = time.perf_counter()
        rollout, timings, components = collect(config, policy, reward, prompts, seeds, executor)
        advantages, reward_metrics = compute_advantages(config, rollout, tracker, accelerator)
        reward_metrics.update(gathered_means(components, accelerator, "reward/components/"))
        if gold is not None:
            with torch.no_grad():
                reward_metrics.update(gathered_means({"gold_mean": gold(rollout.images, rollout.prompts)},
                                                     accelerator, "reward/"))
        start_train = time.perf_counter()
        train_metrics, steps = train_epoch(config, algorithm, policy, optimizer, rollout, advantages, accelerator,
                                           epoch)
        state.global_step += steps
        state.epochs_done = epoch + 1
        record = {"epoch": epoch, "global_step": state.global_step, **reward_metrics, **train_metrics, **timings,
                  "time/train_s": time.perf_counter() - start_train, "time/epoch_s": time.perf_counter() - start}
        if config.eval_freq and state.epochs_done % config.eval_freq == 0 and state.epochs_done < config.epochs:
            if accelerator.is_main_process:
                record.update({f"eval/{k}": v for k, v in evaluate(config, policy, judges, eval_sets)[0].items()})
        record = {k: (float(f"{v:.8g}") if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        progress.set_postfix(reward=f"{record['reward/mean']:.4g}", kl=f"{record.get('policy/approx_kl', 0):.2g}")
        if config.log_with != "none":
            accelerator.log(record, step=epoch)
        if run is not None:
            run.log(record)
        if state.epochs_done % config.save_freq == 0 or state.epochs_done == config.epochs:
            state.stat_tracker = tracker.state_dict() if tracker is not None else None
            if accelerator.is_main_process:
                save_checkpoint(run.path / "checkpoints" / str(state.epochs_done), policy.base_unet, optimizer, state)
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        final_metrics, images = evaluate(config, policy, judges, eval_sets)
        run.save_samples(config.epochs, images, eval_sets["train"])
        (run.path / "samples" / "after.png").write_bytes(
            (run.path / "samples" / f"epoch_{config.epochs:04d}.png").read_bytes())
        summary = {"preset": config.preset, "reward": config.reward, "model": config.model.name,
                   "epochs": config.epochs, "global_step": state.global_step, "final": final_metrics}
        if "base" in state.extra:
            summary["base"] = state.extra["base"]
        run.finish(summary, f"diffalign {config.algorithm} — {config.preset} — {config.reward}")
    accelerator.end_training()
    if executor is not None:
        executor.shutdown()
    return TrainResult(run_path, policy, tracker)
