"""The training noise schedule and the sigma tables the sigma-space samplers share.

Follows diffusers 0.42.1 schedulers/scheduling_euler_discrete.py (__init__, set_timesteps,
_sigma_to_t, _convert_to_karras, scale_model_input, add_noise). Timesteps are computed in numpy
with diffusers' dtypes and operation order, so they equal diffusers' exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sdxl_core.schedulers.base import Index, Schedule, per_sample

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Options diffusers offers that no SDXL checkpoint uses; refused rather than silently ignored.
_UNSUPPORTED = {
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "rescale_betas_zero_snr": False,
    "interpolation_type": "linear",
}


def check_supported(config: dict[str, Any], name: str, prediction_types=PREDICTION_TYPES) -> None:
    """ValueError naming any resolved-config value this sampler cannot reproduce."""
    for key, supported in _UNSUPPORTED.items():
        if key in config and config[key] != supported:
            raise ValueError(f"scheduler {name!r}: {key}={config[key]!r} is not supported; use {supported!r}")
    if config["prediction_type"] not in prediction_types:
        raise ValueError(
            f"scheduler {name!r}: prediction_type={config['prediction_type']!r} is not supported; "
            f"use one of {list(prediction_types)}"
        )


def betas(config: dict[str, Any]) -> torch.Tensor:
    """(num_train_timesteps,) float32 betas of the config's beta_schedule (or its trained_betas)."""
    n = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    if config["beta_schedule"] == "linear":
        return torch.linspace(config["beta_start"], config["beta_end"], n, dtype=torch.float32)
    if config["beta_schedule"] == "scaled_linear":
        return torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    raise ValueError(f"beta_schedule={config['beta_schedule']!r} is not supported; use 'linear' or 'scaled_linear'")


def alphas_cumprod(config: dict[str, Any]) -> torch.Tensor:
    """(num_train_timesteps,) float32 cumulative product of 1 - beta (DDPM's alpha-bar)."""
    return torch.cumprod(1.0 - betas(config), dim=0)


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """(num_train_timesteps,) float32 sigma of each training timestep: sqrt((1 - a) / a), ascending."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def spaced_timesteps(config: dict[str, Any], num_inference_steps: int) -> np.ndarray:
    """(S,) float32 descending timesteps by timestep_spacing (Lin et al. 2023, table 2), as diffusers."""
    n_train, n = config["num_train_timesteps"], num_inference_steps
    if not 1 <= n <= n_train:
        raise ValueError(f"num_inference_steps must be between 1 and num_train_timesteps={n_train}, got {n}")
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        step_ratio = n_train // n
        return (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32) + config["steps_offset"]
    if spacing == "trailing":
        step_ratio = n_train / n
        return np.arange(n_train, 0, -step_ratio).round().copy().astype(np.float32) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; use one of {list(TIMESTEP_SPACINGS)}")


def karras_sigmas(sigmas: np.ndarray, n: int, sigma_min: float | None, sigma_max: float | None) -> np.ndarray:
    """(n,) sigmas of Karras et al. 2022 (eq. 5, rho = 7) between the schedule's (or the given) extremes."""
    sigma_min = sigma_min if sigma_min is not None else sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """(n,) fractional training timesteps of `sigmas`, by linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[np.newaxis, :] - log_sigmas[:, np.newaxis]  # (num_train_timesteps, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def sigma_schedule(
    config: dict[str, Any], num_inference_steps: int, alphas_cumprod: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """(S,) timesteps and (S,) sigmas before the final one: spaced, interpolated, optionally Karras."""
    timesteps = spaced_timesteps(config, num_inference_steps)
    train = train_sigmas(alphas_cumprod)
    sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
    if config.get("use_karras_sigmas"):
        sigmas = karras_sigmas(sigmas, num_inference_steps, config.get("sigma_min"), config.get("sigma_max"))
        timesteps = sigma_to_t(sigmas, np.log(train))
    return timesteps, sigmas


def init_noise_sigma(sigmas: torch.Tensor, config: dict[str, Any]) -> float:
    """Std of the initial noise: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (as diffusers)."""
    max_sigma = sigmas.max().cpu()
    if config["timestep_spacing"] in ("linspace", "trailing"):
        return max_sigma.item()
    return ((max_sigma**2 + 1) ** 0.5).item()


def predict_original(
    prediction_type: str, sample: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The denoised sample x0 from the model output at noise level `sigma` (Karras et al. 2022, VP as VE)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":  # Salimans & Ho 2022, in sigma space
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    return model_output  # "sample"


class SigmaSampler:
    """scale_model_input and add_noise of the samplers that work on a sigma table (Euler, Heun, LMS)."""

    def scale_model_input(self, schedule: Schedule, sample: torch.Tensor, index: Index) -> torch.Tensor:
        """The UNet input sample / sqrt(sigma^2 + 1): the VE sample back in the VP space the UNet was trained in."""
        sigma = per_sample(schedule.sigmas, index, sample, dtype=schedule.sigmas.dtype)
        return (sample / ((sigma**2 + 1) ** 0.5)).to(sample.dtype)

    def add_noise(self, schedule: Schedule, original: torch.Tensor, noise: torch.Tensor, index: Index) -> torch.Tensor:
        """`original` + noise * sigma at step `index` (diffusers' add_noise with the pipeline's begin index)."""
        return original + noise * per_sample(schedule.sigmas, index, original)
