"""Heun's second-order method over a sigma schedule (Karras et al. 2022, algorithm 1 without churn).

Follows diffusers 0.42.1 schedulers/scheduling_heun_discrete.py (HeunDiscreteScheduler). As there,
each step but the last takes two model calls, so the schedule repeats every timestep after the
first: [t0, t1, t1, t2, t2, ...]. An even index is the Euler (first) stage from sigma_i to
sigma_i+1, the following odd index the correction (second) stage over the same interval.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from sdxl_core.noise import GeneratorLike
from sdxl_core.schedulers import common
from sdxl_core.schedulers.base import Index, Schedule, broadcast, per_sample, resolve_config


class Heun(common.SigmaSampler):
    """Euler predictor, then trapezoidal corrector: d = (d_i + d_next) / 2 over the same dt."""

    name = "heun"
    defaults: ClassVar[dict[str, Any]] = {  # diffusers' __init__ defaults
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "clip_sample": False, "clip_sample_range": 1.0,
        "timestep_spacing": "linspace", "steps_offset": 0,
    }

    def make_schedule(self, num_inference_steps: int, config: dict[str, Any], device=None) -> Schedule:
        """HeunDiscreteScheduler.set_timesteps(num_inference_steps) as data: 2S - 1 timesteps, 2S sigmas."""
        config = resolve_config(config, self.defaults)
        common.check_supported(config, self.name)
        alphas_cumprod = common.alphas_cumprod(config)
        timesteps, sigmas = common.sigma_schedule(config, num_inference_steps, alphas_cumprod)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])  # (2S,)
        timesteps = torch.from_numpy(timesteps)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(torch.float32)  # (2S - 1,)
        # both stages of step i move from sigma_i to sigma_i+1: index k's interval starts at sigmas[k - k % 2]
        start = torch.arange(len(timesteps)) // 2 * 2
        dt = sigmas[start + 1] - sigmas[start]
        return Schedule(
            sampler=self, timesteps=timesteps.to(device), alphas_cumprod=alphas_cumprod.to(device), config=config,
            init_noise_sigma=common.init_noise_sigma(sigmas, config), order=2, sigmas=sigmas.to(device),
            extra={"dt": dt.to(device)},
        )

    def step(
        self, schedule: Schedule, index: Index, sample: torch.Tensor, model_output: torch.Tensor,
        state: dict, generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """The Euler stage at an even index, the correction stage at an odd one; `state` links the two."""
        first_stage = index % 2 == 0  # bool, or (B,) bool
        # both stages divide by sigmas[index]: sigma_i in the first, sigma_i+1 (repeated) in the second
        sigma = per_sample(schedule.sigmas, index, sample, dtype=torch.float32)
        dt = per_sample(schedule.extra["dt"], index, sample, dtype=torch.float32)
        config = schedule.config
        denoised = common.predict_original(config["prediction_type"], sample, model_output, sigma)
        if config["clip_sample"]:
            denoised = denoised.clamp(-config["clip_sample_range"], config["clip_sample_range"])
        d = (sample - denoised) / sigma
        x = sample + d * dt
        if not bool(torch.as_tensor(first_stage).all()):
            if "derivative" not in state:
                raise ValueError(
                    f"Heun's second stage at index {index} needs the state left by the first stage at index - 1; "
                    "start a request at an even index"
                )
            corrected = state["sample"] + (state["derivative"] + d) / 2 * dt
            x = corrected if isinstance(index, int) else torch.where(broadcast(first_stage, x), x, corrected)
        state["derivative"], state["sample"] = d, sample
        return x.to(sample.dtype)


heun = Heun()
