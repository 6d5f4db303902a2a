"""DDIM (Song et al. 2020, arXiv:2010.02502), as diffusers' DDIMScheduler.

Follows diffusers 0.42.1 src/diffusers/schedulers/scheduling_ddim.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sdxl_core.noise import GeneratorLike, randn
from sdxl_core.schedulers import common
from sdxl_core.schedulers.base import Index, Schedule, per_sample, resolve_config

# DDIMScheduler.__init__ defaults, plus `eta`, the pipeline's per-call argument for DDIM's step.
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
    "eta": 0.0,  # 0 is DDIM (deterministic), 1 is DDPM-like
}


def check_steps(num_inference_steps: int, config: dict[str, Any]) -> None:
    """ValueError unless 1 <= num_inference_steps <= num_train_timesteps."""
    n, train = num_inference_steps, config["num_train_timesteps"]
    if not 1 <= n <= train:
        raise ValueError(f"num_inference_steps must be between 1 and num_train_timesteps={train}, got {n}")


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (arXiv:2205.11487): clamp to a per-sample percentile s and divide by s."""
    flat = x0.reshape(x0.shape[0], -1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile needs float
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def ddim_timesteps(num_inference_steps: int, config: dict[str, Any]) -> np.ndarray:
    """DDIMScheduler.set_timesteps: `num_inference_steps` training timesteps, descending, int64."""
    if config["timestep_spacing"] == "linspace":  # rounded, unlike Euler's
        return np.linspace(0, config["num_train_timesteps"] - 1, num_inference_steps).round()[::-1].astype(np.int64)
    return common.spaced_timesteps(config, num_inference_steps).astype(np.int64)


def x0_and_eps(
    prediction_type: str, sample: torch.Tensor, model_output: torch.Tensor, alpha_prod_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoised sample and the noise implied by the model output at alpha_prod_t."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    if prediction_type == "v_prediction":
        x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        return x0, alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    raise ValueError(f"prediction_type={prediction_type!r}; use epsilon, sample or v_prediction")


class DDIM:
    """DDIM's update x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z, per sample."""

    name = "ddim"
    defaults = DEFAULTS

    def make_schedule(self, num_inference_steps: int, config: dict[str, Any], device=None) -> Schedule:
        config = resolve_config(config, DEFAULTS)
        common.check_supported(config, self.name)
        check_steps(num_inference_steps, config)
        train = config["num_train_timesteps"]
        alphas_cumprod = common.alphas_cumprod(config)
        timesteps = torch.from_numpy(ddim_timesteps(num_inference_steps, config))
        if int(timesteps.max()) >= train:  # "leading" spacing plus steps_offset can pass the training schedule
            raise ValueError(f"scheduler {self.name!r}: steps_offset={config['steps_offset']} puts timestep "
                             f"{int(timesteps.max())} past num_train_timesteps={train}; lower it")
        # DDIM steps to t - train // n whatever the spacing, as diffusers does.
        prev = timesteps - train // num_inference_steps
        final = torch.tensor(1.0) if config["set_alpha_to_one"] else alphas_cumprod[0]
        alpha_prod_t = alphas_cumprod[timesteps]
        alpha_prod_t_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        return Schedule(
            sampler=self, timesteps=timesteps.to(device), alphas_cumprod=alphas_cumprod, config=config,
            extra={"alpha_prod_t": alpha_prod_t, "alpha_prod_t_prev": alpha_prod_t_prev, "variance": variance},
        )

    def scale_model_input(self, schedule: Schedule, sample: torch.Tensor, index: Index) -> torch.Tensor:
        return sample

    def step(
        self, schedule: Schedule, index: Index, sample: torch.Tensor, model_output: torch.Tensor,
        state: dict, generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """DDIMScheduler.step (use_clipped_model_output=False); `state` is unused."""
        c = schedule.config
        alpha_prod_t = per_sample(schedule.extra["alpha_prod_t"], index, sample)
        alpha_prod_t_prev = per_sample(schedule.extra["alpha_prod_t_prev"], index, sample)
        x0, eps = x0_and_eps(c["prediction_type"], sample, model_output, alpha_prod_t)
        if c["thresholding"]:
            x0 = dynamic_threshold(x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
        elif c["clip_sample"]:
            x0 = x0.clamp(-c["clip_sample_range"], c["clip_sample_range"])
        std_dev_t = c["eta"] * per_sample(schedule.extra["variance"], index, sample) ** 0.5
        prev_sample = alpha_prod_t_prev**0.5 * x0 + (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * eps
        if c["eta"] > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std_dev_t * noise
        return prev_sample

    def add_noise(self, schedule: Schedule, original: torch.Tensor, noise: torch.Tensor, index: Index) -> torch.Tensor:
        """q(x_t | x_0) at the timestep of step `index`: sqrt(a) x0 + sqrt(1 - a) noise."""
        alpha_prod = per_sample(schedule.alphas_cumprod, schedule.timesteps[index], original)
        return alpha_prod**0.5 * original + (1 - alpha_prod) ** 0.5 * noise


ddim = DDIM()
