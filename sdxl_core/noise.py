"""Gaussian noise drawn exactly as the reference draws it, so equal seeds give equal images."""

from __future__ import annotations

import torch

GeneratorLike = torch.Generator | list[torch.Generator] | None


def randn(
    shape: tuple[int, ...], generator: GeneratorLike, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Gaussian noise drawn as diffusers' randn_tensor: on the generator's device, one per sample if a list."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
