"""Linear multistep (order 4) over a sigma schedule (k-diffusion's sample_lms).

Follows diffusers 0.42.1 schedulers/scheduling_lms_discrete.py (LMSDiscreteScheduler). diffusers
integrates each Lagrange basis polynomial with scipy.integrate.quad; the basis has degree < 4, so
its exact integral comes from the antiderivative in closed form instead (no scipy needed).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from sdxl_core.noise import GeneratorLike
from sdxl_core.schedulers import common
from sdxl_core.schedulers.base import Index, Schedule, per_sample, resolve_config

ORDER = 4


def lms_coefficients(sigmas: np.ndarray, order: int = ORDER) -> np.ndarray:
    """(S, order) weights: row t integrates, over [sigma_t, sigma_t+1], the Lagrange basis of the last
    min(t + 1, order) sigmas; column j weighs the derivative from j steps back (0 = newest)."""
    sigmas = sigmas.astype(np.float64)
    table = np.zeros((len(sigmas) - 1, order))
    for t in range(len(sigmas) - 1):
        nodes = sigmas[t - np.arange(min(t + 1, order))]  # sigma_t, sigma_t-1, ...
        for j, node in enumerate(nodes):
            others = np.delete(nodes, j)
            antiderivative = P.polyint(P.polyfromroots(others) / np.prod(node - others))
            table[t, j] = P.polyval(sigmas[t + 1], antiderivative) - P.polyval(sigmas[t], antiderivative)
    return table


class LMS(common.SigmaSampler):
    """x += sum_j c_j * d_j over the last 4 derivatives d = (x - x0) / sigma (Adams-Bashforth in sigma)."""

    name = "lms"
    defaults: ClassVar[dict[str, Any]] = {  # diffusers' __init__ defaults
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
    }

    def make_schedule(self, num_inference_steps: int, config: dict[str, Any], device=None) -> Schedule:
        """LMSDiscreteScheduler.set_timesteps(num_inference_steps) as data, with the coefficient table."""
        config = resolve_config(config, self.defaults)
        common.check_supported(config, self.name)
        alphas_cumprod = common.alphas_cumprod(config)
        timesteps, sigmas = common.sigma_schedule(config, num_inference_steps, alphas_cumprod)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        if np.any(np.diff(sigmas) >= 0):  # e.g. "leading" + steps_offset at 1000 steps clamps t=1000 to t=999
            raise ValueError(
                f"scheduler 'lms' needs strictly decreasing sigmas; {num_inference_steps} steps with "
                f"timestep_spacing={config['timestep_spacing']!r} repeat one (diffusers divides by zero there)"
            )
        coefficients = torch.from_numpy(lms_coefficients(sigmas)).to(torch.float32)  # (S, 4)
        sigmas = torch.from_numpy(sigmas)
        return Schedule(
            sampler=self, timesteps=torch.from_numpy(timesteps).to(device, torch.float32),
            alphas_cumprod=alphas_cumprod.to(device), config=config,
            init_noise_sigma=common.init_noise_sigma(sigmas, config), sigmas=sigmas.to(device),
            extra={"lms_coefficients": coefficients.to(device)},
        )

    def step(
        self, schedule: Schedule, index: Index, sample: torch.Tensor, model_output: torch.Tensor,
        state: dict, generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """One LMS step; state["derivatives"] keeps this request's last 4 derivatives, oldest first.

        A request started mid-schedule has fewer derivatives than the order; as in diffusers, the
        newest ones are weighed with the full order's coefficients and the missing ones dropped.
        """
        sigma = per_sample(schedule.sigmas, index, sample, dtype=torch.float32)
        denoised = common.predict_original(schedule.config["prediction_type"], sample, model_output, sigma)
        derivatives = state.setdefault("derivatives", [])
        derivatives.append((sample - denoised) / sigma)
        del derivatives[:-ORDER]
        coefficients = schedule.extra["lms_coefficients"]
        update = 0
        for j, d in enumerate(reversed(derivatives)):
            update = update + per_sample(coefficients[:, j], index, sample, dtype=torch.float32) * d
        return (sample + update).to(sample.dtype)


lms = LMS()
