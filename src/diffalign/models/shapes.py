"""The ShapesWorld base model: a small text-to-image latent diffusion model in Stable-Diffusion format.

It has SD 1.x's classes, only smaller (sizes chosen by timing a DDPO epoch on a 2-core CPU, see
``assets/shapes-base/README.md``)::

    AutoencoderKL          32×32×3 images ⇄ 4×8×8 latents (×4 down-sampling, no mid-block attention)
    UNet2DConditionModel   on 4×8×8 latents, cross-attention at 4×4 and 2×2, pooled text in the time embedding
    CLIPTextModel          a small causal transformer over OpenAI CLIP's real BPE tokens (49,408 ids)
    CLIPTokenizer          OpenAI CLIP's tokenizer (built offline), captions padded to 32 tokens
    DDIMScheduler          SD 1.x's scaled-linear betas and leading spacing; the UNet predicts ε, as SD 1.x's

The trained weights ship in ``models/assets/shapes-base/`` (:func:`base_model_path`); ``diffalign pretrain
shapes`` (:func:`diffalign.train.pretrain_shapes.pretrain`) rebuilds them from a seed. The folder loads with plain
``diffusers.StableDiffusionPipeline.from_pretrained(base_model_path())``, offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffalign.models.tiny import SD_SCHEDULER_CONFIG
from diffalign.models.tokenizer import clip_tokenizer, save_clip_tokenizer

#: Where the shipped pipeline lives inside the package.
BASE_MODEL_DIR = Path(__file__).parent / "assets" / "shapes-base"
#: The pipeline's component folders (besides ``model_index.json``).
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

#: Side of the images the model draws: ShapesWorld's canvas (``diffalign.world.scenes.IMAGE_SIZE``, which a
#: test checks equals this; models/ does not import world/).
IMAGE_SIZE = 32
#: Captions are padded/truncated to this many tokens (the longest grammar caption has 12, BOS/EOS included).
TOKENIZER_MAX_LENGTH = 32
TEXT_HIDDEN_SIZE = 32
LATENT_CHANNELS = 4
VAE_SCALE_FACTOR = 4
LATENT_SIZE = IMAGE_SIZE // VAE_SCALE_FACTOR

#: AutoencoderKL: 16/32/64 channels, two down-samplings (×4), a KL-regularised 4-channel latent.
#: ``scaling_factor`` is a placeholder here; pretraining sets it to 1 / std of the trained latents (SD's recipe).
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    mid_block_add_attention=False,
    scaling_factor=1.0,
)

#: UNet2DConditionModel on 4×8×8 latents, 8×8 → 4×4 → 2×2 at 32/64/128 channels (4.1 M parameters):
#: residual blocks only at 8×8, self- and cross-attention (transformer blocks) at 4×4, 2×2 and in the middle.
#: Attention at 8×8 too made a DDPO epoch ~40% slower. ``addition_embed_type="text"`` also adds an
#: attention-pooled summary of the text states to the timestep embedding, so every residual block (8×8 ones
#: included) is conditioned on the caption; in short pretraining runs it learned colours, shapes and counts
#: much sooner than cross-attention alone. It needs no extra inputs: a plain StableDiffusionPipeline runs it.
#: (diffusers' ``attention_head_dim`` is the number of heads for this class, a legacy name.)
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN_SIZE,
    attention_head_dim=4,
    norm_num_groups=8,
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
)

#: CLIPTextModel: CLIP's 49,408-token vocabulary at width 32 (the embedding is most of its 1.6 M parameters).
TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TEXT_HIDDEN_SIZE,
    intermediate_size=4 * TEXT_HIDDEN_SIZE,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=TOKENIZER_MAX_LENGTH,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

#: SD 1.x's DDIM schedule (scaled-linear betas, leading spacing) and ε-prediction, as SD 1.x. At the full pretraining
#: budget ε-prediction drew far more captions right than x0-prediction (the first shipped model): held-out strict
#: accuracy 0.52 against 0.15 on ``ddpo-shapes``' evaluation set, binding 0.59 against 0.10 (README, ShapesWorld).
SCHEDULER_CONFIG = {**SD_SCHEDULER_CONFIG, "prediction_type": "epsilon"}


def base_model_path() -> Path:
    """The folder of the shipped, pretrained ShapesWorld pipeline; raises if its weights are missing."""
    missing = [name for name in COMPONENTS if not (BASE_MODEL_DIR / name).is_dir()]
    if missing or not (BASE_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the ShapesWorld base model is missing from {BASE_MODEL_DIR} (missing: "
            f"{', '.join(missing) or 'model_index.json'}); rebuild it with `diffalign pretrain shapes`"
        )
    return BASE_MODEL_DIR


def build_vae() -> AutoencoderKL:
    """An untrained AutoencoderKL with :data:`VAE_CONFIG` (initialised from torch's global RNG)."""
    return AutoencoderKL(**VAE_CONFIG)


def build_unet() -> UNet2DConditionModel:
    """An untrained UNet2DConditionModel with :data:`UNET_CONFIG` (initialised from torch's global RNG)."""
    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder() -> CLIPTextModel:
    """An untrained CLIPTextModel with :data:`TEXT_ENCODER_CONFIG` (initialised from torch's global RNG)."""
    return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))


def build_tokenizer() -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer with ``model_max_length`` :data:`TOKENIZER_MAX_LENGTH`."""
    return clip_tokenizer(TOKENIZER_MAX_LENGTH)


def build_scheduler(prediction_type: str = SCHEDULER_CONFIG["prediction_type"]) -> DDIMScheduler:
    """The DDIM scheduler with :data:`SCHEDULER_CONFIG` (the shipped model's ε-prediction unless
    ``prediction_type`` says otherwise)."""
    return DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type})


def assemble_pipeline(
    vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
    prediction_type: str = SCHEDULER_CONFIG["prediction_type"],
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of the given components with the ShapesWorld tokenizer and scheduler."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipeline: StableDiffusionPipeline, directory: str | Path) -> Path:
    """Writes ``pipeline`` (fp32 safetensors) in the layout ``StableDiffusionPipeline.from_pretrained`` reads.

    The tokenizer is stored as CLIP's ``vocab.json`` + ``merges.txt`` only (1.5 MB, readable by every
    transformers version); the 3.6 MB ``tokenizer.json`` it would also write is rebuilt from them on load.
    """
    directory = Path(directory)
    pipeline.save_pretrained(directory, safe_serialization=True)
    tokenizer_dir = save_clip_tokenizer(directory / "tokenizer", TOKENIZER_MAX_LENGTH)
    (tokenizer_dir / "tokenizer.json").unlink(missing_ok=True)
    for path in directory.rglob("*"):  # safetensors files are written owner-only (0600); ship them readable
        if path.is_file():
            path.chmod(0o644)
    return directory


def build_pipeline(seed: int = 0,
                   prediction_type: str = SCHEDULER_CONFIG["prediction_type"]) -> StableDiffusionPipeline:
    """The untrained ShapesWorld pipeline, its random weights a pure function of ``seed``; its scheduler says
    what the UNet is to predict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae, unet, text_encoder = build_vae(), build_unet(), build_text_encoder()
    return assemble_pipeline(vae, unet, text_encoder, prediction_type)
