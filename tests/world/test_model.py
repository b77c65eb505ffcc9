"""The ShapesWorld base model: the shipped folder, the pretraining recipe, and the shipped model's quality."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import preset, replace
from diffalign.models import Policy, load_policy
from diffalign.rewards.shapes import ShapesReward
from diffalign.rollout import StepSettings, derive_seed, sample
from diffalign.samplers import ddim_step
from diffalign.train.loop import train
from diffalign.world import model as shapes_model
from diffalign.world.captions import caption_split, parse_caption
from diffalign.world.pretrain import (
    EVAL_STEPS,
    PretrainConfig,
    _examples,
    diffusion_target,
    eval_captions,
    pretrain,
    sample_grid_prompts,
)

WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")
#: Measured for the shipped model (see assets/shapes-base/README.md), with margin: strict accuracy of 32 single
#: captions at 20 DDIM steps.
SINGLE_STRICT_THRESHOLD = 0.75
GUIDANCE_SCALE = PretrainConfig().eval_guidance_scale


def _tiny_config(output_dir, **overrides) -> PretrainConfig:
    values = dict(output_dir=str(output_dir), seed=3, num_threads=1, vae_steps=2, vae_batch_size=4, unet_steps=3,
                  unet_batch_size=4, warmup_steps=1, sample_every=2, eval_samples_per_family=1,
                  vae_check_samples=4)
    return PretrainConfig(**{**values, **overrides})


def test_base_model_path_names_the_fix_when_weights_are_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes_model, "BASE_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="diffalign pretrain shapes"):
        shapes_model.base_model_path()


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
    config = replace(preset("ddpo-shapes"), run_dir=str(tmp_path / "run"), epochs=1, eval_samples=4, save_freq=1,
                     log_with="none", **{"sample.batch_size_per_device": 4, "sample.num_inference_steps": 4,
                                         "sample.samples_per_prompt": 2, "train.batch_size_per_device": 4,
                                         "train.stat_min_count": 2})
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


def test_training_batches_are_train_split_and_deterministic():
    captions, images = _examples(seed=5, step=7, stream=1, n=16)
    again_captions, again_images = _examples(seed=5, step=7, stream=1, n=16)
    assert captions == again_captions and torch.equal(images, again_images)
    assert all(caption_split(c) == "train" for c in captions)
    assert images.shape == (16, 3, 32, 32)
    other, _ = _examples(seed=5, step=8, stream=1, n=16)
    assert other != captions


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_target_is_what_the_ddim_step_inverts(prediction_type):
    """Fed the exact target, the sampler's x̂0 (DDIM eq. 12 / v-parameterisation) recovers the clean latent."""
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    schedule = Policy.from_pipeline(shapes_model.build_pipeline(0)).schedule
    t = torch.tensor([10, 500, 990])
    alpha_t = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * noise
    target = diffusion_target(x0, noise, alpha_t, prediction_type)
    step = ddim_step(target, x_t, t, t - 50, schedule.alphas_cumprod, eta=0.0, with_log_prob=False,
                     final_alpha_cumprod=schedule.final_alpha_cumprod, prediction_type=prediction_type)
    torch.testing.assert_close(step.x0_pred, x0, atol=1e-4, rtol=1e-4)


def test_pretrain_config_validate_names_every_bad_field():
    config = PretrainConfig(vae_steps=0, caption_dropout=1.5, eval_guidance_scale=0.5)
    with pytest.raises(ValueError) as error:
        config.check()
    for name in ("vae_steps", "caption_dropout", "eval_guidance_scale"):
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

    policy = load_policy(str(first))
    assert policy.vae.config.scaling_factor > 0
    assert sample(policy, ["a red circle"], [0], StepSettings(2, 5.0, eta=1.0)).images.shape == (1, 3, 32, 32)
