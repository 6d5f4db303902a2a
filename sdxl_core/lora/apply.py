"""Adapters applied unfused: a forward hook on each adapted layer adds the active adapters' terms, row by row.

The base weights stay as loaded. Which adapters are active, at which weight on which rows, is the calling
thread's context (`applied`, `applied_rows`), so threads sharing one model may each run their own adapters, and
one forward may hold rows with different adapters, or none. `fuse` adds terms into the weights instead.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial

import torch
from torch import nn

from sdxl_core.lora.adapter import LoraAdapter, LoraLayer

Loras = Mapping[LoraAdapter, float]  # one run's adapters and their weights
_HOOK = "_sdxl_lora_hook"
_GENERATION = "_sdxl_lora_detached"  # how many times detach ran on a model: an adapter attached before, re-attaches


class RowWeights:
    """An adapter's weight on each row of a forward: one value for every row, or one per row."""

    def __init__(self, weights: float | Sequence[float]):
        if not isinstance(weights, (int, float)) and len(set(weights)) == 1:
            weights = weights[0]
        self.value = float(weights) if isinstance(weights, (int, float)) else None
        self.weights = None if self.value is not None else torch.tensor(weights, dtype=torch.float64)
        self._placed: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add(self, output: torch.Tensor, layer: LoraLayer, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """output plus the layer's term on the rows this adapter has (scaled by each row's weight)."""
        if self.value is not None:
            return output if self.value == 0 else layer.add_to(output, x, module, self.value)
        rows, subset = self._on(output)
        shape = (-1,) + (1,) * (output.dim() - 1)
        if subset is None:
            return layer.add_to(output, x, module, rows.view(shape))
        return output.index_add(0, subset, layer.delta(x.index_select(0, subset), module, rows.view(shape)))

    def _on(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weights of the rows to compute, their indices or None for all) on `like`'s device and dtype."""
        key = (like.device, like.dtype)
        if key not in self._placed:
            nonzero = self.weights.nonzero().flatten()
            if len(nonzero) == len(self.weights):
                self._placed[key] = (self.weights.to(like.device, like.dtype), None)
            else:
                self._placed[key] = (self.weights[nonzero].to(like.device, like.dtype), nonzero.to(like.device))
        return self._placed[key]


_ATTACH_LOCK = threading.Lock()
_ACTIVE: ContextVar[dict[LoraAdapter, RowWeights] | None] = ContextVar("sdxl_lora_active", default=None)


def _forward_hook(model_ref: weakref.ref, path: str, module: nn.Module, args: tuple, output: torch.Tensor):
    active = _ACTIVE.get()
    if not active:
        return None
    model = model_ref()
    for adapter, weights in active.items():
        layer = adapter.for_model(model).get(path)
        if layer is not None:
            output = weights.add(output, layer, args[0], module)
    return output


def attach(adapter: LoraAdapter) -> None:
    """Hook every layer the adapter adapts (once per layer, whatever the number of adapters); a no-op for a
    model it is attached to since that model's last `detach`."""
    with _ATTACH_LOCK:
        _attach(adapter)


def _attach(adapter: LoraAdapter) -> None:
    for component, layers in adapter.layers.items():
        model = adapter.models[component]()
        generation = getattr(model, _GENERATION, 0)
        if model is None or adapter.attached.get(component) == generation:
            continue
        adapter.attached[component] = generation
        for path in layers:
            module = model.get_submodule(path)
            if getattr(module, _HOOK, None) is None:
                handle = module.register_forward_hook(partial(_forward_hook, weakref.ref(model), path))
                object.__setattr__(module, _HOOK, handle)


def detach(model: nn.Module) -> None:
    """Remove every adapter hook from `model`'s layers."""
    object.__setattr__(model, _GENERATION, getattr(model, _GENERATION, 0) + 1)
    for module in model.modules():
        handle = getattr(module, _HOOK, None)
        if handle is not None:
            handle.remove()
            object.__setattr__(module, _HOOK, None)


@contextmanager
def _active(weights: dict[LoraAdapter, RowWeights]) -> Iterator[None]:
    for adapter in weights:
        attach(adapter)
    token = _ACTIVE.set(weights or None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def applied(loras: Loras | None, scale: float = 1.0):
    """Within the block, this thread's forwards add each adapter's terms at weight * scale on every row."""
    return _active({adapter: RowWeights(weight * scale) for adapter, weight in (loras or {}).items()})


def applied_rows(parts: Sequence[tuple[Loras | None, int]]):
    """Within the block, this thread's forwards have rows of several runs, in order: (that run's adapters and
    weights, its number of rows). Each row gets its own run's adapters; a run without adapters, none."""
    adapters = {adapter: None for loras, _ in parts for adapter in (loras or {})}
    weights = {adapter: RowWeights([(loras or {}).get(adapter, 0.0) for loras, rows in parts for _ in range(rows)])
               for adapter in adapters}
    return _active(weights)


@torch.no_grad()
def fuse(loras: Loras, sign: float = 1.0) -> None:
    """Add each adapter's terms at its weight into the adapted layers' weights (sign -1: take them out)."""
    for adapter, weight in loras.items():
        for component, layers in adapter.layers.items():
            model = adapter.models[component]()
            for path, layer in layers.items():
                w = model.get_submodule(path).weight
                w.copy_((w.float() + layer.weight().to(w.device) * (sign * weight)).to(w.dtype))


def unfuse(loras: Loras) -> None:
    """Take out what `fuse(loras)` added."""
    fuse(loras, -1.0)
