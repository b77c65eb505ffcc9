"""The Policy: one adapter around a diffusers Stable-Diffusion-format pipeline.

Everything downstream (rollout, algorithms, steering) talks to a :class:`Policy` — denoiser, text encoder, VAE
and schedule — and never branches on the model family. Classifier-free guidance lives in exactly one function,
:func:`guided_model_output`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import nn

from diffalign.models.lora import has_lora
from diffalign.samplers import inference_timesteps


@dataclass(frozen=True)
class Schedule:
    """The noise schedule and timestep layout of a model, read once from its scheduler config.

    ``alphas_cumprod`` is ᾱ_t for t = 0..T−1 (fp32, ``[T]``); ``final_alpha_cumprod`` is ᾱ used after the last
    step (1 when ``set_alpha_to_one``, else ᾱ_0).
    """

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    num_train_timesteps: int
    prediction_type: str
    timestep_spacing: str
    steps_offset: int
    clip_sample_range: float | None

    @classmethod
    def from_scheduler_config(cls, config) -> Schedule:
        """Builds the schedule from any diffusers scheduler config (Euler, PNDM, DDIM, ... all share betas)."""
        if config.get("thresholding", False):
            raise ValueError("scheduler config: dynamic thresholding is not supported; set thresholding=False")
        for key, allowed in [("prediction_type", ("epsilon", "v_prediction", "sample")),
                             ("timestep_spacing", ("leading", "trailing", "linspace"))]:
            if config.get(key, allowed[0]) not in allowed:
                raise ValueError(f"scheduler config: {key} must be one of {', '.join(allowed)}, got {config[key]!r}")
        steps = config.get("num_train_timesteps", 1000)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"scheduler config: num_train_timesteps must be an int >= 1, got {steps!r}")
        ddim = DDIMScheduler.from_config(config)
        return cls(
            alphas_cumprod=ddim.alphas_cumprod.float().clone(),
            final_alpha_cumprod=float(ddim.final_alpha_cumprod),
            num_train_timesteps=int(ddim.config.num_train_timesteps),
            prediction_type=ddim.config.prediction_type,
            timestep_spacing=ddim.config.timestep_spacing,
            steps_offset=int(ddim.config.steps_offset),
            clip_sample_range=float(ddim.config.clip_sample_range) if ddim.config.clip_sample else None,
        )

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The descending inference timesteps ``[N]`` for this model's spacing."""
        return inference_timesteps(
            self.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )


def guided_model_output(
    denoiser: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The denoiser output with classifier-free guidance (Ho & Salimans 2022): ε_u + w (ε_c − ε_u).

    ``x_t`` ``[B, C, h, w]``, ``t`` ``[B]``, embeddings ``[B, L, D]``. With ``guidance_scale == 1`` or no
    negative embeddings it is one conditional pass; otherwise one pass on the doubled batch [uncond; cond].
    """
    if negative_embeds is None or guidance_scale == 1.0:
        return denoiser(x_t, t, encoder_hidden_states=prompt_embeds).sample
    both = denoiser(
        torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds])
    ).sample
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class Policy(nn.Module):
    """A text-to-image latent diffusion model: ``unet`` (trainable, maybe with LoRA), frozen ``vae`` and
    ``text_encoder``, its ``tokenizer`` and :class:`Schedule`.

    ``unet`` may be replaced by a wrapped module (DDP) with the same call signature. The base model (what KL
    penalties and drift are measured against) is the UNet with its LoRA disabled, or, for full fine-tuning, a
    frozen copy made by :meth:`keep_reference`.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, schedule: Schedule):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.reference_unet: nn.Module | None = None

    @classmethod
    def from_pipeline(cls, pipeline) -> Policy:
        """Adapts a diffusers ``StableDiffusionPipeline`` (or any pipeline with the same components)."""
        return cls(
            pipeline.unet,
            pipeline.vae,
            pipeline.text_encoder,
            pipeline.tokenizer,
            Schedule.from_scheduler_config(pipeline.scheduler.config),
        )

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def base_unet(self) -> nn.Module:
        """The UNet itself, unwrapped from DDP or compile wrappers."""
        unet = self.unet
        while hasattr(unet, "module"):
            unet = unet.module
        return getattr(unet, "_orig_mod", unet)

    def keep_reference(self) -> None:
        """Keeps a frozen copy of the UNet as the base model (full fine-tuning; LoRA needs none)."""
        self.reference_unet = copy.deepcopy(self.base_unet).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within the block, the policy computes the base model: LoRA adapters disabled, or the reference copy.

        Not for concurrent use with training steps (it switches the shared UNet's adapters off).
        """
        unet = self.base_unet
        if has_lora(unet):
            unet.disable_adapters()
            try:
                yield
            finally:
                unet.enable_adapters()
        elif self.reference_unet is not None:
            trained, self.unet = self.unet, self.reference_unet
            try:
                yield
            finally:
                self.unet = trained
        else:
            raise ValueError("the base model is unknown: the UNet has no LoRA adapter and no reference copy "
                             "(call policy.keep_reference() before fine-tuning the whole UNet)")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents the UNet denoises."""
        config = self.base_unet.config
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, h, w)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> tuple[int, int]:
        _, h, w = self.latent_shape
        return (h * self.vae_scale_factor, w * self.vae_scale_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states ``[B, L, D]`` for ``prompts`` (padded to the tokenizer's max length)."""
        if isinstance(prompts, str):
            raise ValueError(f"encode_prompts: prompts must be a list of strings, got the single string {prompts!r}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"encode_prompts: prompt {i} is a {type(prompt).__name__} ({prompt!r}), not a string")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(f"encode_prompts: prompt {i} ({prompt!r}) is not valid text: {error.reason} at "
                                 f"character {error.start} (a lone surrogate, e.g. from undecodable bytes)") from None
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def model_output(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The (guided) denoiser output for latents ``[B, C, h, w]`` at per-sample timesteps ``[B]``."""
        dtype = next(self.base_unet.parameters()).dtype
        return guided_model_output(
            self.unet,
            x_t.to(dtype),
            t.to(x_t.device),
            prompt_embeds.to(dtype),
            None if negative_embeds is None else negative_embeds.to(dtype),
            guidance_scale,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` → images ``[B, 3, H, W]`` in [0, 1] (differentiable)."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(latents).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → latents (a sample of the VAE posterior, scaled)."""
        posterior = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist
        return posterior.sample(generator) * self.vae.config.scaling_factor
