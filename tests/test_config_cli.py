"""Configs and the CLI: presets validate, bad settings are rejected before anything runs, --help documents."""

import json
import os
from pathlib import Path

import pytest

from diffalign import cli
from diffalign.config import PRESETS, Config, preset, replace
from diffalign.models.tiny import build_tiny_clip
from diffalign.train.loop import train

LAION_DIR = Path(os.environ.get("DIFFALIGN_LAION_AESTHETIC_DIR",
                                Path(__file__).resolve().parents[2] / "shared" / "data" / "laion-aesthetic"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    assert preset(name).validate() == []


@pytest.mark.parametrize("name", [n for n in sorted(PRESETS) if n.startswith("ddpo-sd15")])
def test_reference_presets_run_with_the_tiny_model(name, tmp_path):
    """DDPO's reference experiments, unchanged but for the model and the sizes a CPU can run."""
    config = preset(name)
    assert config.model.name == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert config.sample.num_inference_steps == 50 and config.method.clip_range == 1e-4
    kwargs = {}
    if config.reward.name == "aesthetic":  # the real LAION head on a tiny random CLIP of the same class
        head = LAION_DIR / "sac+logos+ava1-l14-linearMSE.pth"
        if not head.is_file():
            pytest.skip(f"LAION aesthetic head not found at {head} (set DIFFALIGN_LAION_AESTHETIC_DIR)")
        build_tiny_clip(768).save_pretrained(tmp_path / "clip")
        kwargs = {"head": str(head), "clip_model": str(tmp_path / "clip")}
    small = replace(config, run_dir=str(tmp_path / "run"), epochs=1, log_with="none",
                    **{"reward.kwargs": kwargs, "model.name": "tiny", "model.mixed_precision": "no", "sample.num_inference_steps": 3,
                       "sample.batch_size_per_device": 2, "sample.num_batches_per_epoch": 1,
                       "train.batch_size_per_device": 1, "train.gradient_accumulation_steps": 2})
    run = train(small).run_dir
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["global_step"] == 1 and record["reward/mean"] == pytest.approx(record["reward/mean"])


def _errors(**changes):
    return "\n".join(replace(preset("ddpo-tiny"), **changes).validate())


def test_invalid_settings_name_field_value_and_rule():
    assert "sample.eta must be > 0" in _errors(**{"sample.eta": 0.0})
    assert "train.batch_size_per_device (3) must divide" in _errors(**{"train.batch_size_per_device": 3})
    assert "gradient_accumulation_steps (3) must divide" in _errors(**{"train.gradient_accumulation_steps": 3})
    assert "reward 'aesthetics' is not registered" in _errors(**{"reward.name": "aesthetics"})
    assert "unknown prompt source 'animals'" in _errors(prompts="animals")
    assert "model.name" in _errors(**{"model.name": "./no/such/model"})
    assert "timestep_fraction must be in (0, 1], got 1.5" in _errors(**{"method.timestep_fraction": 1.5})
    assert "timestep_fraction must be in (0, 1], got 0.0" in _errors(**{"method.timestep_fraction": 0.0})
    errors = replace(preset("ddpo-tiny"), prompts="y", **{"reward.name": "x"}).validate()
    assert len(errors) == 2  # every problem at once


def test_cli_rejects_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit, match="sample.eta must be > 0"):
        cli.main(["train", "--preset", "ddpo-tiny", "--sample.eta", "0", "--run-dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit, match="unknown preset"):
        cli.main(["train", "--preset", "nope"])


def test_cli_config_show_applies_overrides(capsys):
    cli.main(["config", "show", "--preset", "ddpo-tiny", "--epochs", "7", "--sample.guidance-scale", "2.5"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["epochs"] == 7 and shown["sample"]["guidance_scale"] == 2.5 and shown["preset"] == "ddpo-tiny"
    cli.main(["config", "validate", "--preset", "ddpo-sd15-compressibility"])
    assert "valid" in capsys.readouterr().out


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for phrase in ["Registered reward name", "DDIM stochasticity", "PPO clip range", "Fraction of each trajectory",
                   "--run-dir", "--resume"]:
        assert phrase in text, phrase


def test_config_defaults_are_ddpos():
    c = Config()
    assert (c.sample.eta, c.sample.guidance_scale, c.train.learning_rate, c.method.adv_clip_max) == (1.0, 5.0, 3e-4, 5)


def test_sample_command_writes_the_images_and_what_they_cost(tmp_path):
    import numpy as np
    from PIL import Image

    from diffalign.images import to_uint8
    from diffalign.models import load_policy
    from diffalign.rollout import StepSettings, sample, sample_seed

    out = tmp_path / "plain"
    cli.main(["sample", "--prompt", "a cat", "a dog", "--num-inference-steps", "3", "--reward", "brightness",
              "--seed", "7", "--out", str(out)])
    record = json.loads((out / "sample.json").read_text())
    # 2 images × 3 steps × a guided pass (2 rows); one reward call per image
    assert (record["denoiser_passes"], record["reward_calls"], len(record["rewards"])) == (12, 2, 2)
    expected = sample(load_policy("tiny"), ["a cat", "a dog"], [sample_seed(7, 0, i) for i in range(2)],
                      StepSettings(num_inference_steps=3, guidance_scale=5.0, eta=1.0)).images
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:04d}.png")), to_uint8(expected)[i].numpy())
    assert (out / "grid.png").is_file()


# One caption, 2 particles, 3 guided steps (2 rows per pass): 12 passes; SVDD's first step evaluates the single
# x_T and its last step's candidates are x_0: 2 + 2 steps × 2 candidates × 2 rows.
@pytest.mark.parametrize("steer, passes", [("best-of-n", 12), ("fk", 12), ("svdd", 10), ("guidance", 12)])
def test_sample_command_steers(tmp_path, steer, passes):
    out = tmp_path / steer
    cli.main(["sample", "--model", "tiny", "--steer", steer, "--particles", "2", "--prompt", "a cat",
              "--reward", "brightness", "--num-inference-steps", "3", "--out", str(out)])
    record = json.loads((out / "sample.json").read_text())
    assert record["steer"] == steer and record["steering"]["particles"] == 2 and len(record["rewards"]) == 1
    assert record["denoiser_passes"] == passes and record["reward_calls"] >= 2 and (out / "0000.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--steer", "fk"], "needs --reward"),
    (["--steer", "svdd", "--reward", "brightness", "--eta", "0"], "eta > 0"),
    (["--steer", "guidance", "--reward", "jpeg_compressibility"], "not differentiable"),
])
def test_sample_command_refuses_bad_steering(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["sample", "--prompt", "a cat", "--num-inference-steps", "2", "--out", str(tmp_path), *args])


def test_the_learned_shapes_reward_is_judged_by_the_verifiable_one():
    from diffalign.config import RewardConfig

    assert RewardConfig(name="shapes_learned").gold_name == "shapes"
    assert RewardConfig(name="shapes_learned", gold="brightness").gold_name == "brightness"
    assert RewardConfig(name="shapes").gold_name is None
