"""UniPC multistep predictor-corrector (Zhao et al. 2023, arXiv:2302.04867), as diffusers' UniPCMultistepScheduler.

Follows diffusers 0.42.1 src/diffusers/schedulers/scheduling_unipc_multistep.py (multistep_uni_p_bh_update,
multistep_uni_c_bh_update, step). Each step first corrects the previous prediction with the new model
output (UniC), then predicts the next sample (UniP); both use the B(h) variants bh1 / bh2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sdxl_core.noise import GeneratorLike
from sdxl_core.schedulers import common
from sdxl_core.schedulers.base import Index, Schedule, resolve_config
from sdxl_core.schedulers.ddim import check_steps
from sdxl_core.schedulers.dpm_solver import (
    add_noise_at_sigma,
    alpha_sigma,
    check_unsupported,
    data_prediction,
    log_snr,
    shared_index,
    sigmas_for_steps,
)

# UniPCMultistepScheduler.__init__ defaults.
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
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "sigma_min": None,
    "sigma_max": None,
    "shift_terminal": None,
}

UNSUPPORTED = {"solver_p": None, "use_flow_sigmas": False, "use_dynamic_shifting": False, "shift_terminal": None}


def model_prediction(config: dict[str, Any], sigma: torch.Tensor, sample: torch.Tensor, model_output: torch.Tensor):
    """What UniPC extrapolates: x0 (predict_x0, the default) or the noise epsilon."""
    if config["predict_x0"]:
        return data_prediction(config, sigma, sample, model_output)
    alpha_t, sigma_t = alpha_sigma(sigma)
    kind = config["prediction_type"]
    if kind == "epsilon":
        return model_output
    if kind == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    return alpha_t * model_output + sigma_t * sample  # v_prediction


def _order_conditions(rks: torch.Tensor, hh: torch.Tensor, B_h: torch.Tensor, order: int):
    """The linear system R rho = b whose solution weighs the finite differences (the paper's order conditions)."""
    h_phi_k, factorial, R, b = torch.expm1(hh) / hh - 1, 1, [], []
    for k in range(1, order + 1):
        R.append(torch.pow(rks, k - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(R), torch.stack(b)


def uni_bh_update(
    config: dict[str, Any], sigmas: torch.Tensor, s: int, x: torch.Tensor, outputs: list[torch.Tensor], order: int,
    model_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniP (model_t None) or UniC (model_t: the new prediction at s + 1) from sigmas[s] to sigmas[s + 1].

    outputs[-1] is the model prediction at step s, outputs[-1 - k] the one at step s - k.
    """
    alpha_t, sigma_t = alpha_sigma(sigmas[s + 1])
    alpha_s0, sigma_s0 = alpha_sigma(sigmas[s])
    lambda_s0 = log_snr(alpha_s0, sigma_s0)
    h = log_snr(alpha_t, sigma_t) - lambda_s0
    m0 = outputs[-1]
    rks, D1s = [], []
    for k in range(1, order):
        rk = (log_snr(*alpha_sigma(sigmas[s - k])) - lambda_s0) / h
        rks.append(rk)
        D1s.append((outputs[-1 - k] - m0) / rk)
    rks = torch.stack([*rks, torch.ones_like(h)])

    hh = -h if config["predict_x0"] else h
    h_phi_1 = torch.expm1(hh)
    B_h = hh if config["solver_type"] == "bh1" else h_phi_1
    R, b = _order_conditions(rks, hh, B_h, order)
    if config["predict_x0"]:
        x_t, scale = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t
    else:
        x_t, scale = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t
    if model_t is None:  # UniP: rhos solve the order - 1 system (0.5 for order 2)
        if order == 1:
            return x_t.to(x.dtype)
        rhos = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        residual = torch.einsum("k,bk...->b...", rhos.to(x.device, x.dtype), torch.stack(D1s, dim=1))
        return (x_t - scale * B_h * residual).to(x.dtype)
    rhos = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)  # UniC: the full system
    rhos = rhos.to(x.device, x.dtype)
    residual = torch.einsum("k,bk...->b...", rhos[:-1], torch.stack(D1s, dim=1)) if D1s else 0
    return (x_t - scale * B_h * (residual + rhos[-1] * (model_t - m0))).to(x.dtype)


class UniPCMultistep:
    """UniPC-bh2 of order 2 by default, warming up from order 1 and lowering the order over the final steps."""

    name = "unipc"
    defaults = DEFAULTS

    def make_schedule(self, num_inference_steps: int, config: dict[str, Any], device=None) -> Schedule:
        config = resolve_config(config, DEFAULTS)
        if config["solver_type"] in ("midpoint", "heun", "logrho"):  # DPM-Solver / DEIS names, mapped as diffusers does
            config["solver_type"] = "bh2"
        self._check(num_inference_steps, config)
        alphas_cumprod = common.alphas_cumprod(config)
        timesteps, sigmas = sigmas_for_steps(num_inference_steps, config, alphas_cumprod, config["num_train_timesteps"])
        if config["final_sigmas_type"] == "zero":
            final = 0.0
        elif config["use_karras_sigmas"]:
            final = sigmas[-1]  # the Karras sigma_min, which the config may set (DPM-Solver's has no such key)
        else:
            final = ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5
        if config["use_karras_sigmas"]:
            timesteps = timesteps.round()
        sigmas = np.concatenate([sigmas, [final]]).astype(np.float32)
        return Schedule(
            sampler=self, timesteps=torch.from_numpy(timesteps).to(device=device, dtype=torch.int64),
            alphas_cumprod=alphas_cumprod, config=config, sigmas=torch.from_numpy(sigmas),
        )

    def _check(self, num_inference_steps: int, config: dict[str, Any]) -> None:
        common.check_supported(config, self.name)
        check_unsupported(config, self.name, UNSUPPORTED)
        check_steps(num_inference_steps, config)
        if config["solver_type"] not in ("bh1", "bh2"):
            raise ValueError(f"solver_type={config['solver_type']!r}; use bh1 or bh2")
        if config["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={config['final_sigmas_type']!r}; use zero or sigma_min")
        if config["final_sigmas_type"] == "zero" and (config["solver_type"] == "bh1" or not config["predict_x0"]):
            # B(h) = h, or the noise-prediction form, is infinite at sigma 0: diffusers returns NaN there.
            raise ValueError(
                f"scheduler {self.name!r}: solver_type={config['solver_type']!r} with predict_x0="
                f"{config['predict_x0']} needs final_sigmas_type='sigma_min' (its last step, to sigma 0, is NaN)"
            )

    def scale_model_input(self, schedule: Schedule, sample: torch.Tensor, index: Index) -> torch.Tensor:
        return sample

    def step(
        self, schedule: Schedule, index: Index, sample: torch.Tensor, model_output: torch.Tensor,
        state: dict, generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """UniPCMultistepScheduler.step; `state` holds model_outputs, last_sample, this_order, lower_order_nums."""
        i, c, sigmas = shared_index(index), schedule.config, schedule.sigmas
        prediction = model_prediction(c, sigmas[i], sample, model_output)
        outputs = state.setdefault("model_outputs", [])
        if i > 0 and i - 1 not in c["disable_corrector"] and "last_sample" in state:
            sample = uni_bh_update(c, sigmas, i - 1, state["last_sample"], outputs, state["this_order"], prediction)
        outputs.append(prediction)
        del outputs[: -c["solver_order"]]
        taken = state.get("lower_order_nums", 0)
        order = min(c["solver_order"], schedule.num_steps - i) if c["lower_order_final"] else c["solver_order"]
        state["this_order"] = min(order, taken + 1)
        state["last_sample"] = sample
        state["lower_order_nums"] = min(taken + 1, c["solver_order"])
        return uni_bh_update(c, sigmas, i, sample, outputs, state["this_order"])

    def add_noise(self, schedule: Schedule, original: torch.Tensor, noise: torch.Tensor, index: Index) -> torch.Tensor:
        return add_noise_at_sigma(schedule.sigmas, original, noise, index)


unipc = UniPCMultistep()
