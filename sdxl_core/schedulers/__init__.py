"""Samplers selectable by name, and the per-request schedule they step over.

    schedule = make_schedule("euler", 50, components.scheduler_config)
    state = {}
    for i, t in enumerate(schedule.timesteps):
        eps = unet(schedule.sampler.scale_model_input(schedule, x, i), t, ...)
        x = schedule.sampler.step(schedule, i, x, eps, state, generator)
"""

from __future__ import annotations

from typing import Any

from sdxl_core.configs import SDXL_SCHEDULER_CONFIG
from sdxl_core.schedulers.base import Index, Sampler, Schedule, per_sample, resolve_config
from sdxl_core.schedulers.ddim import ddim
from sdxl_core.schedulers.dpm_solver import dpmpp_2m, dpmpp_2m_karras
from sdxl_core.schedulers.euler import euler, euler_ancestral
from sdxl_core.schedulers.heun import heun
from sdxl_core.schedulers.lms import lms
from sdxl_core.schedulers.options import check
from sdxl_core.schedulers.unipc import unipc

__all__ = ["SCHEDULERS", "Index", "Sampler", "Schedule", "check_options", "make_schedule", "per_sample",
           "resolve_config"]

SCHEDULERS: dict[str, Sampler] = {
    "euler": euler,  # EulerDiscreteScheduler, SDXL's default
    "euler_a": euler_ancestral,  # EulerAncestralDiscreteScheduler
    "heun": heun,  # HeunDiscreteScheduler
    "lms": lms,  # LMSDiscreteScheduler
    "ddim": ddim,  # DDIMScheduler
    "dpmpp_2m": dpmpp_2m,  # DPMSolverMultistepScheduler (dpmsolver++, solver_order 2)
    "dpmpp_2m_karras": dpmpp_2m_karras,  # the same with use_karras_sigmas=True
    "unipc": unipc,  # UniPCMultistepScheduler
}


def check_options(name: str, options: dict[str, Any], config: dict[str, Any] | None = None,
                  num_inference_steps: int | None = None) -> None:
    """ValueError naming a request's from_config override (key, value, and what is accepted) that scheduler
    `name` does not take; `config` (the model's, default SDXL 1.0's) completes the ranges that span keys."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    check(SCHEDULERS[name], options, SDXL_SCHEDULER_CONFIG if config is None else config, num_inference_steps)


def make_schedule(name: str, num_inference_steps: int, config: dict[str, Any] | None = None, device=None) -> Schedule:
    """The schedule of sampler `name` for `num_inference_steps`, from a model's scheduler config
    (as diffusers' XScheduler.from_config(config) then set_timesteps); None means SDXL 1.0's."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    config = SDXL_SCHEDULER_CONFIG if config is None else config
    return SCHEDULERS[name].make_schedule(num_inference_steps, config, device)
