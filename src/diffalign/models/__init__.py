"""Models: the Policy adapter, model loading, LoRA, the tiny and ShapesWorld builders and the offline CLIP tokenizer."""

from diffalign.models.loading import load_policy, resolve_model
from diffalign.models.lora import add_lora, save_lora
from diffalign.models.policy import Policy, Schedule, guided_model_output
from diffalign.models.tiny import build_tiny_pipeline, save_tiny_pipeline

__all__ = [
    "Policy",
    "Schedule",
    "add_lora",
    "build_tiny_pipeline",
    "guided_model_output",
    "load_policy",
    "resolve_model",
    "save_lora",
    "save_tiny_pipeline",
]
