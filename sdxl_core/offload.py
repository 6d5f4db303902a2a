"""Model CPU offload: one component on the accelerator at a time, through accelerate's hooks.

As diffusers' `enable_model_cpu_offload`: each model gets accelerate's CpuOffload hook,
chained so that running a model first sends the previous one back to the CPU. Hooks fire
on `forward`; stage functions that call other methods (the VAE's encode/decode) call
`onload` first, as diffusers' `apply_forward_hook` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import cpu_offload_with_hook
from accelerate.hooks import UserCpuOffloadHook
from torch import nn


def enable_model_cpu_offload(models: Sequence[nn.Module | None], device: torch.device | str) -> list[UserCpuOffloadHook]:
    """Hook `models` (in the order a request uses them; None skipped) to run on `device`, one at a time."""
    hooks, previous = [], None
    for model in models:
        if model is None:
            continue
        _, previous = cpu_offload_with_hook(model, torch.device(device), prev_module_hook=previous)
        hooks.append(previous)
    return hooks


def onload(model: nn.Module) -> None:
    """Move an offloaded model to its execution device (and the previous one off it) before a non-forward call."""
    hook = getattr(model, "_hf_hook", None)
    if hook is not None:
        hook.pre_forward(model)
