"""The ShapesWorld base model: the builder, the shipped folder, and the shipped model's quality."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.models import load_policy
from diffalign.models import shapes as shapes_model
from diffalign.rewards.shapes import ShapesReward
from diffalign.rollout import StepSettings, derive_seed, sample
from diffalign.train.pretrain_shapes import EVAL_STEPS, PretrainConfig, eval_captions
from diffalign.world import scenes
from diffalign.world.captions import parse_caption

#: Measured for the shipped model (see models/assets/shapes-base/README.md), with margin: strict accuracy of 32
#: single captions at 20 DDIM steps.
SINGLE_STRICT_THRESHOLD = 0.75
GUIDANCE_SCALE = PretrainConfig().eval_guidance_scale


def test_image_size_is_the_shapesworld_canvas():
    """models/ keeps its own copy of the canvas size (it must not import world/); the two must agree."""
    assert shapes_model.IMAGE_SIZE == scenes.IMAGE_SIZE == 32
    assert shapes_model.LATENT_SIZE == 32 // 4
    assert shapes_model.VAE_CONFIG["sample_size"] == scenes.IMAGE_SIZE


def test_base_model_path_names_the_fix_when_weights_are_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes_model, "BASE_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="diffalign pretrain shapes"):
        shapes_model.base_model_path()


def test_shipped_folder_lives_in_models_assets():
    path = shapes_model.base_model_path()
    assert path.parts[-3:] == ("models", "assets", "shapes-base")


def test_shipped_folder_loads_offline_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(shapes_model.base_model_path(), local_files_only=True)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert pipe.scheduler.config.prediction_type == shapes_model.SCHEDULER_CONFIG["prediction_type"]
    assert pipe.tokenizer("a red circle").input_ids[:2] == [49406, 320]  # OpenAI CLIP's ids
    out = pipe("a red circle", num_inference_steps=4, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32)


def test_load_policy_shapes_samples_32px_images():
    policy = load_policy("shapes")
    assert policy.latent_shape == (shapes_model.LATENT_CHANNELS, shapes_model.LATENT_SIZE, shapes_model.LATENT_SIZE)
    assert policy.image_size == (32, 32)
    rollout = sample(policy, ["a red circle", "two blue squares"], [0, 1], StepSettings(4, 5.0, eta=1.0))
    assert rollout.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(rollout.log_probs).all()


def test_ddpo_shapes_preset_reports_heldout_strict_accuracy(tmp_path):
    """The demo's preset, shrunk: the summary carries base and final held-out strict accuracy (issue 3)."""
    from diffalign.config import preset, replace
    from diffalign.train.loop import train

    config = replace(preset("ddpo-shapes"), run_dir=str(tmp_path / "run"), epochs=1, save_freq=1,
                     log_with="none", **{"sample.batch_size_per_device": 4, "sample.num_inference_steps": 4,
                                         "sample.samples_per_prompt": 2, "train.batch_size_per_device": 4,
                                         "method.advantages.min_count": 2, "eval.samples": 4})
    run_dir = train(config).run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    for when in ("base", "final"):
        for key in ("heldout_strict_accuracy", "train_strict_accuracy", "heldout_reward_mean"):
            assert 0.0 <= summary[when][key] <= 1.0, (when, key)
    assert (run_dir / "report.html").is_file() and (run_dir / "samples" / "before.png").is_file()


def test_shipped_model_draws_single_objects_right():
    """The base model gets most single-object captions exactly right (the DDPO headroom is in the others).

    32 fixed captions and seeds, unlike eval.json's; the grammar has no held-out singles, so these are captions
    of the train split drawn with fresh noise.
    """
    policy = load_policy("shapes")
    prompts = eval_captions(seed=2024, split="train", family="single", n=32)
    assert all(parse_caption(p).family == "single" for p in prompts)
    seeds = [derive_seed(2024, 0, i, 9) for i in range(len(prompts))]
    settings = StepSettings(num_inference_steps=EVAL_STEPS, guidance_scale=GUIDANCE_SCALE, eta=0.0)
    images = sample(policy, prompts, seeds, settings).images
    _, strict = ShapesReward().evaluate(images, prompts)
    assert strict.float().mean().item() >= SINGLE_STRICT_THRESHOLD
