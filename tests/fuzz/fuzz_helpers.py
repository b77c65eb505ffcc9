"""Shared pieces of the fuzz suite: hypothesis settings, the "clear error" check, tiny configs and run folders.

Every property ends in one of two ways: a correct result, or an exception of the project's own type whose message
names the offending input and that was raised by diffalign code (the innermost frame of its traceback is under
``src/diffalign``), not by torch, diffusers or the standard library deep inside a call.
"""

from __future__ import annotations

import contextlib
import json
import traceback
from pathlib import Path

from hypothesis import HealthCheck, settings

import diffalign
from diffalign.config import preset, replace

PACKAGE_DIR = Path(diffalign.__file__).resolve().parent

#: Deterministic, database-free, no per-example deadline (a training run takes a second or two); each test sets
#: its own ``max_examples`` so the whole folder stays under a minute on two CPU cores.
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def fuzz(max_examples: int):
    """``@settings`` of this suite with ``max_examples`` examples."""
    return settings(max_examples=max_examples, **FUZZ)


def raised_by_diffalign(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is in the diffalign package."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


def assert_clear_error(error: BaseException, *names: str, types: tuple[type, ...] = (ValueError,)) -> None:
    """``error`` is one of ``types``, raised by diffalign code, and its message names every one of ``names``."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    assert isinstance(error, types), f"{type(error).__name__} (not {types}) from {where}: {error}"
    assert raised_by_diffalign(error), f"{type(error).__name__} raised outside diffalign, at {where}: {error}"
    message = str(error.code) if isinstance(error, SystemExit) else str(error)
    for name in names:
        assert str(name) in message, f"the message does not name {name!r}: {message}"


@contextlib.contextmanager
def registered_reward(name: str, factory):
    """Registers ``factory`` as reward ``name`` for the duration of the block."""
    from diffalign.rewards import registry

    assert name not in registry._FACTORIES, name
    registry._FACTORIES[name] = factory
    try:
        yield
    finally:
        del registry._FACTORIES[name]


def tiny_config(run_dir: Path | str, name: str = "ddpo-tiny", **changes):
    """The tiny preset at the smallest size that still trains: 2 samples of 2 steps per epoch, one optimizer
    step, 2 evaluation samples, no tracker, one checkpoint per epoch."""
    config = replace(preset(name), run_dir=str(run_dir), log_with="none", epochs=1, save_freq=1,
                     **{"sample.num_inference_steps": 2, "sample.batch_size_per_device": 2,
                        "sample.num_batches_per_epoch": 1, "sample.samples_per_prompt": 1,
                        "train.batch_size_per_device": 2, "train.gradient_accumulation_steps": 1,
                        "reward.name": "brightness", "reward.async_scoring": False, "eval.samples": 2,
                        "eval.kl_samples": 0, "eval.diversity_prompts": 0, "method.advantages.min_count": 2})
    return replace(config, **changes)


def assert_complete_run(run_dir: Path, epochs: int) -> None:
    """A finished run folder: config, one metrics line per epoch, the last checkpoint sealed, summary and report."""
    for name in ["config.json", "summary.json", "report.html", f"checkpoints/{epochs}/manifest.json",
                 "samples/before.png", "samples/after.png"]:
        assert (run_dir / name).is_file(), f"{run_dir} has no {name}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(epochs))
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == epochs
