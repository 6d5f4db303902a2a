"""A sampling schedule as data, and the functions every sampler provides over it.

Nothing here lives on a shared object between calls: a `Schedule` is computed per request
and never mutated, and a sampler's multistep history lives in a `state` dict the caller
creates per request (`{}`) and passes to every `step`. So one model can serve concurrent
requests, and a batch can hold samples at different steps (`index` as a (B,) tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sdxl_core.noise import GeneratorLike

Index = int | torch.Tensor  # a step index, or one per sample: (B,) int64


@dataclass(frozen=True)
class Schedule:
    """One request's schedule, equal to what the diffusers scheduler holds after set_timesteps."""

    sampler: Sampler
    timesteps: torch.Tensor  # (S,) the UNet's timestep at each step; Heun repeats entries (order 2)
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float32, the training noise schedule
    config: dict[str, Any]  # the resolved diffusers scheduler config this schedule was built from
    init_noise_sigma: float = 1.0  # initial noise is randn * init_noise_sigma
    order: int = 1  # diffusers' scheduler.order: 2 for Heun (two model calls per step)
    sigmas: torch.Tensor | None = None  # (S+1,) for sigma-space samplers, ending in 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # sampler-specific per-step tables

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


class Sampler(Protocol):
    """One sampling algorithm; implemented as a module-level object in its own file."""

    name: str

    def make_schedule(self, num_inference_steps: int, config: dict[str, Any], device=None) -> Schedule:
        """Timesteps and tables for `num_inference_steps`, as the diffusers counterpart's set_timesteps.

        `config` is a model's scheduler_config.json as read (of any scheduler class); the sampler
        resolves it with `resolve_config` as its diffusers class's `from_config` would.
        """

    def scale_model_input(self, schedule: Schedule, sample: torch.Tensor, index: Index) -> torch.Tensor:
        """The UNet input at step `index` (e.g. sample / sqrt(sigma^2 + 1)); identity where none is needed."""

    def step(
        self, schedule: Schedule, index: Index, sample: torch.Tensor, model_output: torch.Tensor,
        state: dict, generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """The sample after step `index` from the UNet's raw output; `state` carries this request's history."""

    def add_noise(self, schedule: Schedule, original: torch.Tensor, noise: torch.Tensor, index: Index) -> torch.Tensor:
        """`original` noised to the level of step `index` (img2img / inpaint start)."""


def resolve_config(config: dict[str, Any], defaults: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The config `XScheduler.from_config(config, **overrides)` builds in diffusers: known keys over the defaults."""
    used_defaults = set(config.get("_use_default_values", ()))  # keys diffusers itself filled in, not the model's
    known = {k: v for k, v in config.items() if k in defaults and k not in used_defaults}
    return {**defaults, **known, **overrides}


def per_sample(
    table: torch.Tensor, index: Index, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """table[index] shaped to broadcast over `like` (B, C, H, W): one value, or one per sample.

    Floating values are cast to `dtype` (default `like.dtype`); samplers that do their sigma
    arithmetic in float32, as diffusers does, pass torch.float32.
    """
    return broadcast(table[index] if isinstance(index, int) else table[index.to(table.device)], like, dtype)


def broadcast(value: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A 0-d or (B,) `value` on like's device, shaped (B, 1, 1, 1) to broadcast over `like`."""
    if value.is_floating_point():
        value = value.to(device=like.device, dtype=dtype or like.dtype)
    else:
        value = value.to(like.device)
    return value.reshape(-1, *([1] * (like.ndim - 1)))
