"""Euler and Euler-ancestral sampling over a sigma schedule (Karras et al. 2022, algorithm 2 without churn).

Follows diffusers 0.42.1 schedulers/scheduling_euler_discrete.py (EulerDiscreteScheduler, SDXL's
default) and scheduling_euler_ancestral_discrete.py (EulerAncestralDiscreteScheduler).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from sdxl_core.noise import GeneratorLike, randn
from sdxl_core.schedulers import common
from sdxl_core.schedulers.base import Index, Schedule, per_sample, resolve_config


def _sigma(schedule: Schedule, index: Index, like: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """sigmas[index + offset] in float32, broadcast over `like`."""
    return per_sample(schedule.sigmas, index + offset, like, dtype=torch.float32)


class Euler(common.SigmaSampler):
    """Euler's method on the probability-flow ODE: x += (x - x0) / sigma * (sigma_next - sigma)."""

    name = "euler"
    defaults: ClassVar[dict[str, Any]] = {  # diffusers' __init__ defaults
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear",
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None,
        "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0,
        "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    }

    def make_schedule(self, num_inference_steps: int, config: dict[str, Any], device=None) -> Schedule:
        """EulerDiscreteScheduler.set_timesteps(num_inference_steps) as data."""
        config = resolve_config(config, self.defaults)
        common.check_supported(config, self.name)
        if config["timestep_type"] not in ("discrete", "continuous"):
            raise ValueError(f"timestep_type={config['timestep_type']!r} is not supported; use discrete, continuous")
        alphas_cumprod = common.alphas_cumprod(config)
        timesteps, sigmas = common.sigma_schedule(config, num_inference_steps, alphas_cumprod)
        final_sigma = self._final_sigma(config, alphas_cumprod)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [final_sigma]]).astype(np.float32))
        if config["timestep_type"] == "continuous" and config["prediction_type"] == "v_prediction":
            # one 0-d op per sigma, as diffusers: a vectorised log may round differently
            timesteps = torch.stack([0.25 * sigma.log() for sigma in sigmas[:-1]])
        else:
            timesteps = torch.from_numpy(timesteps.astype(np.float32))
        return Schedule(
            sampler=self, timesteps=timesteps.to(device), alphas_cumprod=alphas_cumprod.to(device), config=config,
            init_noise_sigma=common.init_noise_sigma(sigmas, config), sigmas=sigmas.to(device),
        )

    @staticmethod
    def _final_sigma(config: dict[str, Any], alphas_cumprod: torch.Tensor) -> float:
        if config["final_sigmas_type"] == "zero":
            return 0.0
        if config["final_sigmas_type"] == "sigma_min":
            return (((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5).item()
        raise ValueError(f"final_sigmas_type={config['final_sigmas_type']!r} is not supported; use 'zero', 'sigma_min'")

    def step(
        self, schedule: Schedule, index: Index, sample: torch.Tensor, model_output: torch.Tensor,
        state: dict, generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """One Euler step from sigmas[index] to sigmas[index + 1], in float32."""
        sample = sample.to(torch.float32)
        sigma, sigma_next = _sigma(schedule, index, sample), _sigma(schedule, index, sample, 1)
        denoised = common.predict_original(schedule.config["prediction_type"], sample, model_output, sigma)
        d = (sample - denoised) / sigma
        return (sample + d * (sigma_next - sigma)).to(model_output.dtype)


class EulerAncestral(common.SigmaSampler):
    """Euler step down to sigma_down, then fresh noise of std sigma_up (k-diffusion's sample_euler_ancestral, eta=1)."""

    name = "euler_a"
    defaults: ClassVar[dict[str, Any]] = {  # diffusers' __init__ defaults
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }

    def make_schedule(self, num_inference_steps: int, config: dict[str, Any], device=None) -> Schedule:
        """EulerAncestralDiscreteScheduler.set_timesteps(num_inference_steps) as data."""
        config = resolve_config(config, self.defaults)
        common.check_supported(config, self.name, prediction_types=("epsilon", "v_prediction"))
        alphas_cumprod = common.alphas_cumprod(config)
        timesteps, sigmas = common.sigma_schedule(config, num_inference_steps, alphas_cumprod)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        return Schedule(
            sampler=self, timesteps=torch.from_numpy(timesteps).to(device), alphas_cumprod=alphas_cumprod.to(device),
            config=config, init_noise_sigma=common.init_noise_sigma(sigmas, config), sigmas=sigmas.to(device),
        )

    def step(
        self, schedule: Schedule, index: Index, sample: torch.Tensor, model_output: torch.Tensor,
        state: dict, generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """One ancestral step; draws noise of model_output's shape from `generator` at every step, as diffusers."""
        sample = sample.to(torch.float32)
        sigma, sigma_next = _sigma(schedule, index, sample), _sigma(schedule, index, sample, 1)
        denoised = common.predict_original(schedule.config["prediction_type"], sample, model_output, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (sample - denoised) / sigma
        x = sample + d * (sigma_down - sigma)
        noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        return (x + noise * sigma_up).to(model_output.dtype)


euler = Euler()
euler_ancestral = EulerAncestral()
