"""SDXL's vector conditioning: sinusoidal embeddings and the micro-conditioning time ids.

The UNet embeds the timestep and each time id with `timestep_embedding`, then adds
`add_embedding([pooled | embedded ids])` to the timestep embedding (SDXL paper, sec. 2.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sdxl_core.configs import UNetConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) values -> (N, dim) float32 [cos | sin] features.

    diffusers' get_timestep_embedding with flip_sin_to_cos=True, downscale_freq_shift=0.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP from sinusoidal features to the UNet's embedding width."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    if value is None or len(value) != 2:
        raise ValueError(f"{name} must be a pair (height, width) or (top, left), got {value!r}")
    return tuple(value)


def add_time_ids(
    config: UNetConfig,
    original_size: Sequence[float],
    crops_coords_top_left: Sequence[float] = (0, 0),
    target_size: Sequence[float] | None = None,
    aesthetic_score: float | None = None,
    *,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The UNet's `time_ids`, (batch_size, config.num_time_ids).

    Base-type UNets (6 ids): original_size + crops_coords_top_left + target_size.
    Refiner-type UNets (5 ids): original_size + crops_coords_top_left + (aesthetic_score,).
    Sizes are (height, width) in pixels, crops (top, left); the order follows
    _get_add_time_ids in diffusers' pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py.
    """
    ids = _pair("original_size", original_size) + _pair("crops_coords_top_left", crops_coords_top_left)
    if config.requires_aesthetics_score:
        if target_size is not None:
            raise ValueError("target_size is not used by a refiner-type UNet (num_time_ids=5); pass aesthetic_score")
        if aesthetic_score is None:
            raise ValueError(
                "aesthetic_score is required by a refiner-type UNet (num_time_ids=5); SDXL's default is 6.0")
        ids += (aesthetic_score,)
    else:
        if aesthetic_score is not None:
            raise ValueError(
                "aesthetic_score is only used by a refiner-type UNet (num_time_ids=5); this UNet takes target_size")
        ids += _pair("target_size", target_size)
    return torch.tensor([ids], dtype=dtype, device=device).repeat(batch_size, 1)
