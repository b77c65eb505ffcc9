"""Crash-safe checkpoints (manifest, verification, fallback, pruning), the disk check and the numerics guards.

Checkpoint files are exercised on small ``nn.Linear`` modules; the loop parts on the tiny pipeline, 1–2 epochs.
The bit-identical resume is tests/train/test_loop.py's."""

import json
import logging
from collections import namedtuple

import pytest
import torch
from torch import nn

from diffalign.config import preset, replace
from diffalign.train import checkpoint
from diffalign.train.checkpoint import (CheckpointError, TrainerState, check_disk_space, checkpoint_bytes,
                                        latest_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint)
from diffalign.train.loop import train


def _parts(seed: int):
    """A model (3 → 2), a method module ``value`` (2 → 1) and an AdamW with state after one step."""
    torch.manual_seed(seed)
    model, value = nn.Linear(3, 2), nn.Linear(2, 1)
    optimizer = torch.optim.AdamW([*model.parameters(), *value.parameters()], lr=0.1)
    value(model(torch.ones(1, 3))).sum().backward()
    optimizer.step()
    return model, {"value": value}, optimizer


def _save(run, epoch: int, keep_last=None):
    model, modules, optimizer = _parts(epoch)
    return save_checkpoint(run / "checkpoints" / str(epoch), model, modules, optimizer, TrainerState(epoch, 2 * epoch),
                           keep_last=keep_last)


def _epochs(run) -> list[str]:
    return sorted((p.name for p in (run / "checkpoints").iterdir()), key=lambda n: (not n.isdigit(), n.zfill(9)))


def test_a_checkpoint_lists_every_file_and_round_trips(tmp_path):
    folder = _save(tmp_path, 1)
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(manifest) == {"trainable.safetensors", "modules/value.safetensors", "optimizer.pt", "trainer_state.json"}
    assert all(manifest[n]["bytes"] == (folder / n).stat().st_size for n in manifest)
    assert _epochs(tmp_path) == ["1"]  # no .partial-* folder left behind
    model, modules, optimizer = _parts(seed=99)
    state = load_checkpoint(folder, model, modules, optimizer)
    saved, saved_modules, saved_optimizer = _parts(seed=1)
    assert state == TrainerState(1, 2) and torch.equal(model.weight, saved.weight)
    assert torch.equal(modules["value"].bias, saved_modules["value"].bias)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_optimizer.state_dict()["state"][0]["exp_avg"])


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, name, message", [
    (_truncate, "modules/value.safetensors", "modules/value.safetensors has"),
    (_flip_byte, "optimizer.pt", "optimizer.pt does not match its sha256"),
    (lambda path: path.unlink(), "manifest.json", "has no manifest.json"),
    (lambda path: path.unlink(), "trainer_state.json", "trainer_state.json is missing"),
])
def test_a_damaged_checkpoint_is_named_and_nothing_is_loaded(tmp_path, damage, name, message):
    folder = _save(tmp_path, 1)
    damage(folder / name)
    with pytest.raises(CheckpointError, match=message) as error:
        verify_checkpoint(folder)
    assert str(folder) in str(error.value)
    model, modules, optimizer = _parts(seed=99)
    before = [p.detach().clone() for p in [*model.parameters(), *modules["value"].parameters()]]
    moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder, model, modules, optimizer)
    after = [*model.parameters(), *modules["value"].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moment)


def test_a_partial_folder_is_ignored_then_deleted_at_the_next_save(tmp_path):
    _save(tmp_path, 1)
    partial = tmp_path / "checkpoints" / ".partial-2-x1y2"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{")  # what a kill while writing leaves
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "1"
    _save(tmp_path, 2)
    assert _epochs(tmp_path) == ["1", "2"]


def test_fallback_to_an_older_checkpoint_only_when_asked(tmp_path, caplog):
    _save(tmp_path, 1)
    _truncate(_save(tmp_path, 2) / "trainable.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoints/2.*trainable.safetensors.*--resume-fallback"):
        latest_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="diffalign.train"):
        assert latest_checkpoint(tmp_path, fallback=True) == tmp_path / "checkpoints" / "1"
    assert "skipping" in caplog.text and "checkpoints/2" in caplog.text and "trainable.safetensors" in caplog.text
    with pytest.raises(CheckpointError):  # a checkpoint folder named explicitly is never swapped for another
        latest_checkpoint(tmp_path / "checkpoints" / "2", fallback=True)
    _flip_byte(tmp_path / "checkpoints" / "1" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path, fallback=True)


def test_keep_last_prunes_only_after_the_new_checkpoint_is_complete(tmp_path, monkeypatch):
    for epoch in range(1, 5):
        _save(tmp_path, epoch, keep_last=2)
    assert _epochs(tmp_path) == ["3", "4"]

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_seal", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 5, keep_last=1)
    assert _epochs(tmp_path)[:2] == ["3", "4"] and _epochs(tmp_path)[2].startswith(".partial-5-")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "4"
    monkeypatch.undo()
    _save(tmp_path, 5, keep_last=0)  # 0 keeps everything
    _save(tmp_path, 4)  # re-saving an epoch replaces it whole
    assert _epochs(tmp_path) == ["3", "4", "5"] and verify_checkpoint(tmp_path / "checkpoints" / "4")


def test_the_disk_check_names_the_numbers(tmp_path, monkeypatch):
    model, modules, optimizer = _parts(seed=0)
    fresh = torch.optim.AdamW(model.parameters())
    assert checkpoint_bytes([model], fresh) == 3 * 8 * 4  # 8 fp32 weights and, before any step, 2 moments each
    assert checkpoint_bytes([model, modules["value"]], optimizer) > 3 * 11 * 4  # the moments and step counters
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    check_disk_space(tmp_path / "new" / "run", 2**19)
    with pytest.raises(OSError, match=r"1\.0 MiB free.*2\.0 MiB needed.*1\.0 MiB"):
        check_disk_space(tmp_path / "new" / "run", 2**20)


def _tiny(tmp_path, name, **changes):
    return replace(preset("ddpo-tiny"), run_dir=str(tmp_path / name), log_with="none", save_freq=1,
                   **{"epochs": 2, "sample.num_inference_steps": 2, "sample.batch_size_per_device": 2,
                      "sample.num_batches_per_epoch": 1, "train.batch_size_per_device": 2, "eval.samples": 2,
                      "eval.kl_samples": 0, "method.advantages.min_count": 2, "reward.name": "brightness", **changes})


def test_a_run_keeps_its_last_checkpoint_and_refuses_a_corrupt_resume(tmp_path, monkeypatch):
    run = train(_tiny(tmp_path, "run", keep_last=1)).run_dir
    assert _epochs(run) == ["2"] and "lora/pytorch_lora_weights.safetensors" in verify_checkpoint(run / "checkpoints/2")
    assert [json.loads(line)["train/skipped_steps"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 0]
    _flip_byte(run / "checkpoints/2/trainable.safetensors")
    with pytest.raises(CheckpointError, match="resume-fallback"):
        train(_tiny(tmp_path, "run", epochs=3, resume=str(run)))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(_tiny(tmp_path, "run", epochs=3, resume=str(run), resume_fallback=True))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(2**30, 2**30, 1000))
    with pytest.raises(OSError, match="not enough disk space for a checkpoint"):
        train(_tiny(tmp_path, "full-disk"))
    assert not (tmp_path / "full-disk").exists()
    assert "keep_last must be >= 0" in "\n".join(_tiny(tmp_path, "x", keep_last=-1).validate())


def _one_epoch(tmp_path, preset_name: str, poison, **changes):
    """The trained weights before and after one train_epoch of ``preset_name`` on the tiny model, its metrics
    and steps, with ``poison(targets, params)`` applied first."""
    from accelerate import Accelerator

    from diffalign.algorithms import build
    from diffalign.train.loop import build_policy, collect, compute_targets, train_epoch

    config = replace(_tiny(tmp_path, "step"), method=preset(preset_name).method,
                     **{"method.advantages.min_count": 2, **changes})
    accelerator = Accelerator()
    policy = build_policy(config, accelerator)
    algorithm = build(config.method, config.sample.settings())
    optimizer = torch.optim.AdamW([p for p in policy.unet.parameters() if p.requires_grad], lr=1e-3)
    policy.unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    rollout, _, _ = collect(config, algorithm, policy, config.reward.build("cpu")[0], ["a cat"] * 2 + ["a dog"] * 2,
                            [1, 2, 3, 4])
    targets, _ = compute_targets(algorithm, rollout, accelerator, torch.Generator().manual_seed(0))
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    targets = poison(targets, params)
    metrics, steps = train_epoch(config, algorithm, policy, optimizer, rollout, targets, accelerator, epoch=0)
    return before, params, metrics, steps


def _nan_targets(targets, params):
    return torch.full_like(targets, float("nan"))


def _inf_gradient(targets, params):
    params[0].register_hook(lambda grad: grad * float("inf"))
    return targets


@pytest.mark.parametrize("method, poison, metric", [
    ("ddpo-tiny", _nan_targets, "ddpo's loss is nan"),
    ("ddpo-tiny", _inf_gradient, "ddpo's policy/grad_norm is (inf|nan)"),
    ("trpo-tiny", _nan_targets, "trpo's policy/loss is nan"),
])
def test_a_nonfinite_step_stops_with_a_named_error_or_is_skipped_when_asked(tmp_path, method, poison, metric):
    changes = {"sample.num_batches_per_epoch": 2}  # 4 samples, 2 per micro-batch
    with pytest.raises(FloatingPointError, match=f"epoch 0: {metric}.*train.skip_nonfinite_steps"):
        _one_epoch(tmp_path, method, poison, **changes)
    before, params, metrics, steps = _one_epoch(tmp_path, method, poison, **changes,
                                                **{"train.skip_nonfinite_steps": True})
    assert steps == 0 and metrics["train/skipped_steps"] >= 1
    assert all(torch.equal(a, b) for a, b in zip(before, params)), "a skipped step moved the weights"
    assert all(p.grad is None or not p.grad.any() for p in params)
