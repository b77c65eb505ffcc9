"""Tiny random Stable-Diffusion-format pipelines built in code (as diffusers' own tests build them).

They have SD's classes and configs, only smaller: a conditional UNet on 4×16×16 latents, a 2× AutoencoderKL
(32×32 images), a 2-layer CLIP text encoder with OpenAI CLIP's real tokenizer, and SD 1.x's DDIM schedule.
Weights are random but deterministic in ``seed``. Twenty DDIM steps for two images take about half a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from diffalign.models.tokenizer import clip_tokenizer

#: SD 1.x's scheduler settings (scaled-linear betas 0.00085–0.012, leading spacing, steps_offset 1).
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """A tiny random SD-format pipeline (≈ 2 M parameters besides the token embedding), same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    scheduler = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Writes a tiny pipeline to ``directory`` in the layout ``StableDiffusionPipeline.from_pretrained`` reads."""
    directory = Path(directory)
    build_tiny_pipeline(seed).save_pretrained(directory)
    return directory


def build_tiny_clip(projection_dim: int = 768, seed: int = 0, image_size: int = 224) -> CLIPModel:
    """A random ``transformers.CLIPModel`` with 2-layer 32-wide towers and the real CLIP vocabulary size: the
    classes of CLIP-based rewards (aesthetic, PickScore, CLIP score) at test size."""
    common = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=49408, max_position_embeddings=77, eos_token_id=49407),
        vision_config=dict(common, image_size=image_size, patch_size=32),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config).eval()
