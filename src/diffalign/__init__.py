"""diffalign: align text-to-image diffusion models with reward functions."""

__version__ = "0.1.0"
