"""The ShapesWorld pretraining recipe (``diffalign pretrain shapes``): its batches, config and a smoke run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.models import load_policy
from diffalign.models import shapes as shapes_model
from diffalign.rollout import StepSettings, sample
from diffalign.train.pretrain_shapes import PretrainConfig, _examples, pretrain, sample_grid_prompts
from diffalign.world.captions import caption_split

WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")


def _tiny_config(output_dir, **overrides) -> PretrainConfig:
    values = dict(output_dir=str(output_dir), seed=3, num_threads=1, vae_steps=2, vae_batch_size=4, unet_steps=3,
                  unet_batch_size=4, warmup_steps=1, sample_every=2, eval_samples_per_family=1,
                  vae_check_samples=4)
    return PretrainConfig(**{**values, **overrides})


def test_default_output_is_the_shipped_folder():
    assert PretrainConfig().output_dir == str(shapes_model.BASE_MODEL_DIR)


def test_training_batches_are_train_split_and_deterministic():
    captions, images = _examples(seed=5, step=7, stream=1, n=16)
    again_captions, again_images = _examples(seed=5, step=7, stream=1, n=16)
    assert captions == again_captions and torch.equal(images, again_images)
    assert all(caption_split(c) == "train" for c in captions)
    assert images.shape == (16, 3, 32, 32)
    other, _ = _examples(seed=5, step=8, stream=1, n=16)
    assert other != captions


def test_pretrain_config_validate_names_every_bad_field():
    config = PretrainConfig(vae_steps=0, caption_dropout=1.5, eval_guidance_scale=0.5, prediction_type="x0")
    with pytest.raises(ValueError) as error:
        config.check()
    for name in ("vae_steps", "caption_dropout", "eval_guidance_scale", "prediction_type"):
        assert name in str(error.value)


def test_pretrain_smoke_writes_a_loadable_reproducible_pipeline(tmp_path):
    first = pretrain(_tiny_config(tmp_path / "a"))
    second = pretrain(_tiny_config(tmp_path / "b", sample_every=0, eval_samples_per_family=0))
    for name in WEIGHT_FILES:
        a, b = load_file(first / name), load_file(second / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # A different seed gives different weights (the test above could not pass by accident).
    third = pretrain(_tiny_config(tmp_path / "c", seed=4, sample_every=0, eval_samples_per_family=0))
    assert not torch.equal(load_file(first / WEIGHT_FILES[0])["conv_in.weight"],
                           load_file(third / WEIGHT_FILES[0])["conv_in.weight"])

    report = json.loads((first / "eval.json").read_text())
    assert set(report["accuracy"]) == {"train", "heldout"}
    assert set(report["accuracy"]["train"]) == {"single", "counting", "binding", "relation"}
    assert set(report["accuracy"]["heldout"]) == {"counting", "binding", "relation"}
    assert (first / "samples" / "step_000002.png").is_file() and (first / "samples" / "final.png").is_file()
    assert len(sample_grid_prompts(3)) == 16
    assert "diffalign.models.shapes.base_model_path()" in (first / "README.md").read_text()

    policy = load_policy(str(first))
    assert policy.vae.config.scaling_factor > 0
    assert sample(policy, ["a red circle"], [0], StepSettings(2, 5.0, eta=1.0)).images.shape == (1, 3, 32, 32)


def test_pretrain_learns_the_chosen_prediction_type(tmp_path):
    """The default ε-prediction run against an x0 run of the same seed: the same VAE (stage 1 does not depend on
    the prediction type), a scheduler that says which, and UNets that learned different targets."""
    assert PretrainConfig().prediction_type == shapes_model.SCHEDULER_CONFIG["prediction_type"] == "epsilon"
    x0 = pretrain(_tiny_config(tmp_path / "x0", sample_every=0, eval_samples_per_family=0, prediction_type="sample"))
    eps = pretrain(_tiny_config(tmp_path / "eps", sample_every=0, eval_samples_per_family=0))
    assert json.loads((x0 / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "sample"
    assert json.loads((eps / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert load_policy(str(eps)).schedule.prediction_type == "epsilon"
    vae_x0, vae_eps = load_file(x0 / WEIGHT_FILES[1]), load_file(eps / WEIGHT_FILES[1])
    assert all(torch.equal(vae_x0[k], vae_eps[k]) for k in vae_x0)
    assert not torch.equal(load_file(x0 / WEIGHT_FILES[0])["conv_out.weight"],
                           load_file(eps / WEIGHT_FILES[0])["conv_out.weight"])
    assert "prediction type `epsilon`" in (eps / "README.md").read_text()
