"""DPM-Solver++ multistep (Lu et al. 2022, arXiv:2211.01095), as diffusers' DPMSolverMultistepScheduler.

Follows diffusers 0.42.1 src/diffusers/schedulers/scheduling_dpmsolver_multistep.py with
algorithm_type "dpmsolver++" (dpmpp_2m; dpmpp_2m_karras adds use_karras_sigmas=True).
Sigmas are VE sigmas sqrt((1 - a) / a); the solver works in alpha_t = 1 / sqrt(sigma^2 + 1),
sigma_t = sigma * alpha_t and lambda = log(alpha_t / sigma_t).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sdxl_core.noise import GeneratorLike
from sdxl_core.schedulers import common
from sdxl_core.schedulers.base import Index, Schedule, per_sample, resolve_config
from sdxl_core.schedulers.ddim import check_steps, dynamic_threshold

# DPMSolverMultistepScheduler.__init__ defaults.
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}

# Options beyond common.check_supported's that this port refuses rather than ignores.
UNSUPPORTED = {"use_lu_lambdas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False, "variance_type": None}


def shared_index(index: Index) -> int:
    """The step index of a batch the multistep solvers advance together (their history is per batch)."""
    if isinstance(index, int):
        return index
    if not bool((index == index.reshape(-1)[0]).all()):
        raise ValueError(f"multistep solvers need one step index for the whole batch, got {index.tolist()}")
    return int(index.reshape(-1)[0])


def check_unsupported(config: dict[str, Any], name: str, unsupported: dict[str, Any]) -> None:
    """ValueError naming the first option set to a value this port does not implement."""
    for key, supported in unsupported.items():
        if config.get(key, supported) != supported:
            raise ValueError(f"scheduler {name!r}: {key}={config[key]!r} is not supported; use {supported!r}")


def spaced_timesteps(num_inference_steps: int, config: dict[str, Any], last_timestep: int) -> np.ndarray:
    """Timesteps of the multistep solvers' set_timesteps: n of n + 1 spaced points, descending."""
    n = num_inference_steps
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + config["steps_offset"]
    if spacing == "trailing":
        ratio = config["num_train_timesteps"] / n
        return np.arange(last_timestep, 0, -ratio).round().copy().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r}; use linspace, leading or trailing")


def sigmas_for_steps(
    num_inference_steps: int, config: dict[str, Any], alphas_cumprod: torch.Tensor, last_timestep: int
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) for each step, before rounding or the final sigma; Karras' if use_karras_sigmas."""
    timesteps = spaced_timesteps(num_inference_steps, config, last_timestep)
    train_sigmas = common.train_sigmas(alphas_cumprod)
    if not config["use_karras_sigmas"]:
        return timesteps, np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    # Unlike Euler's, the Karras range here is the whole training schedule's.
    sigmas = common.karras_sigmas(
        np.flip(train_sigmas), num_inference_steps, config.get("sigma_min"), config.get("sigma_max")
    )
    return common.sigma_to_t(sigmas, np.log(train_sigmas)), sigmas


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP coefficients (alpha_t, sigma_t) of a VE sigma."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def log_snr(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t), half the log signal-to-noise ratio."""
    return torch.log(alpha_t) - torch.log(sigma_t)


def data_prediction(config: dict[str, Any], sigma: torch.Tensor, sample: torch.Tensor, model_output: torch.Tensor):
    """x0 from the model output at VE `sigma` (convert_model_output for the data-prediction solvers)."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    kind = config["prediction_type"]
    if kind == "epsilon":
        x0 = (sample - sigma_t * model_output) / alpha_t
    elif kind == "sample":
        x0 = model_output
    elif kind == "v_prediction":
        x0 = alpha_t * sample - sigma_t * model_output
    else:
        raise ValueError(f"prediction_type={kind!r}; use epsilon, sample or v_prediction")
    if config["thresholding"]:
        x0 = dynamic_threshold(x0, config["dynamic_thresholding_ratio"], config["sample_max_value"])
    return x0


def add_noise_at_sigma(sigmas: torch.Tensor, original: torch.Tensor, noise: torch.Tensor, index: Index):
    """alpha_t x0 + sigma_t noise at the sigma of step `index`, computed in `original`'s dtype."""
    alpha_t, sigma_t = alpha_sigma(per_sample(sigmas, index, original))
    return alpha_t * original + sigma_t * noise


def first_order_update(sigma_t, sigma_s, sample: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(1), i.e. DDIM in lambda: x_t = sigma_t / sigma_s x_s - alpha_t (e^-h - 1) x0."""
    alpha_t, sigma_t = alpha_sigma(sigma_t)
    alpha_s, sigma_s = alpha_sigma(sigma_s)
    h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s, sigma_s)
    return sigma_t / sigma_s * sample - alpha_t * (torch.exp(-h) - 1.0) * x0


def second_order_update(sigma_t, sigma_s0, sigma_s1, sample, m0, m1, solver_type: str) -> torch.Tensor:
    """Multistep DPM-Solver++(2M): first order plus a finite-difference correction from the last x0."""
    alpha_t, sigma_t = alpha_sigma(sigma_t)
    alpha_s0, sigma_s0 = alpha_sigma(sigma_s0)
    alpha_s1, sigma_s1 = alpha_sigma(sigma_s1)
    lambda_t, lambda_s0, lambda_s1 = log_snr(alpha_t, sigma_t), log_snr(alpha_s0, sigma_s0), log_snr(alpha_s1, sigma_s1)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    D0, D1 = m0, 1.0 / r0 * (m0 - m1)
    x_t = sigma_t / sigma_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * D0
    if solver_type == "midpoint":
        return x_t - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
    return x_t + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * D1  # heun


class DPMSolverMultistep:
    """DPM-Solver++(2M) with diffusers' warm-up (a run's first step is first order) and lower-order final steps."""

    defaults = DEFAULTS

    def __init__(self, name: str, **overrides: Any):
        self.name, self.overrides = name, overrides  # overrides: what the name implies over any config

    def make_schedule(self, num_inference_steps: int, config: dict[str, Any], device=None) -> Schedule:
        config = resolve_config(config, DEFAULTS, **self.overrides)
        common.check_supported(config, self.name)
        if config["solver_type"] in ("logrho", "bh1", "bh2"):  # UniPC / DEIS names, mapped as diffusers does
            config["solver_type"] = "midpoint"
        self._check(num_inference_steps, config)
        alphas_cumprod = common.alphas_cumprod(config)
        lambdas = log_snr(torch.sqrt(alphas_cumprod), torch.sqrt(1 - alphas_cumprod))
        clipped = torch.searchsorted(torch.flip(lambdas, [0]), config["lambda_min_clipped"])
        last_timestep = config["num_train_timesteps"] - int(clipped)
        timesteps, sigmas = sigmas_for_steps(num_inference_steps, config, alphas_cumprod, last_timestep)
        if config["use_karras_sigmas"]:
            timesteps = timesteps.round()
        final = 0.0 if config["final_sigmas_type"] == "zero" else ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5
        sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
        return Schedule(
            sampler=self, timesteps=torch.from_numpy(timesteps).to(device=device, dtype=torch.int64),
            alphas_cumprod=alphas_cumprod, config=config, sigmas=torch.from_numpy(sigmas),
        )

    def _check(self, num_inference_steps: int, config: dict[str, Any]) -> None:
        check_steps(num_inference_steps, config)
        if config["algorithm_type"] != "dpmsolver++":
            raise ValueError(f"algorithm_type={config['algorithm_type']!r} is not supported; use 'dpmsolver++'")
        if config["solver_order"] not in (1, 2):
            raise ValueError(f"solver_order={config['solver_order']}; use 1 or 2")
        if config["solver_type"] not in ("midpoint", "heun"):
            raise ValueError(f"solver_type={config['solver_type']!r}; use midpoint or heun")
        if config["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={config['final_sigmas_type']!r}; use zero or sigma_min")
        check_unsupported(config, self.name, UNSUPPORTED)

    def scale_model_input(self, schedule: Schedule, sample: torch.Tensor, index: Index) -> torch.Tensor:
        return sample

    def step(
        self, schedule: Schedule, index: Index, sample: torch.Tensor, model_output: torch.Tensor,
        state: dict, generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """DPMSolverMultistepScheduler.step; `state` holds model_outputs (x0, newest last) and lower_order_nums."""
        i, c, sigmas = shared_index(index), schedule.config, schedule.sigmas
        last = schedule.num_steps - 1
        lower_order_final = i == last and (
            c["euler_at_final"] or (c["lower_order_final"] and schedule.num_steps < 15)
            or c["final_sigmas_type"] == "zero"
        )
        x0 = data_prediction(c, sigmas[i], sample, model_output)
        outputs = state.setdefault("model_outputs", [])
        outputs.append(x0)
        del outputs[: -c["solver_order"]]
        taken = state.get("lower_order_nums", 0)
        x = sample.to(torch.float32)
        if c["solver_order"] == 1 or taken < 1 or lower_order_final:
            x_t = first_order_update(sigmas[i + 1], sigmas[i], x, x0)
        else:
            x_t = second_order_update(sigmas[i + 1], sigmas[i], sigmas[i - 1], x, x0, outputs[-2], c["solver_type"])
        state["lower_order_nums"] = min(taken + 1, c["solver_order"])
        return x_t.to(model_output.dtype)

    def add_noise(self, schedule: Schedule, original: torch.Tensor, noise: torch.Tensor, index: Index) -> torch.Tensor:
        return add_noise_at_sigma(schedule.sigmas, original, noise, index)


dpmpp_2m = DPMSolverMultistep("dpmpp_2m")
dpmpp_2m_karras = DPMSolverMultistep("dpmpp_2m_karras", use_karras_sigmas=True)
