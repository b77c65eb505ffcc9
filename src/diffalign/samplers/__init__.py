"""Sampler math: schedules and the DDIM step with log-prob, as pure functions."""

from diffalign.samplers.ddim import DDIMStepOutput, ddim_step, inference_timesteps, previous_timestep

__all__ = ["DDIMStepOutput", "ddim_step", "inference_timesteps", "previous_timestep"]
