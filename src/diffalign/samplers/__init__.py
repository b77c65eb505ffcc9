"""Sampler math as pure functions: schedules, the DDIM step with log-prob, the noising process and its closed forms."""

from diffalign.samplers.ddim import (
    DDIMStepOutput, ddim_step, gaussian_log_prob, inference_timesteps, previous_timestep,
)
from diffalign.samplers.noising import (
    backward_log_prob, diffusion_target, epsilon_equivalent_weight, gaussian_kl, q_sample, renoise, shift_epsilon,
)

__all__ = [
    "DDIMStepOutput",
    "backward_log_prob",
    "ddim_step",
    "diffusion_target",
    "epsilon_equivalent_weight",
    "gaussian_kl",
    "gaussian_log_prob",
    "inference_timesteps",
    "previous_timestep",
    "q_sample",
    "renoise",
    "shift_epsilon",
]
