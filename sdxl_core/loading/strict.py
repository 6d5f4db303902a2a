"""The one strict loader: check every name and shape first, then stream tensors into a meta model.

Every layout (diffusers folders, original single files) produces TensorSpecs and
calls load_strict, so there is one place where a mismatch becomes an error and
no `strict=False` anywhere. Tensors are read one at a time and placed directly
at their final dtype and device, so peak memory is about the weights' size.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from sdxl_core.errors import CheckpointMismatchError, UnsafeCheckpointError, WeightsNotFoundError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor in a checkpoint: its shape is known up front, its data read by load()."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


@contextmanager
def meta_init():
    """Build modules with parameters on the meta device and real buffers (e.g. CLIP's position_ids)."""
    with init_empty_weights(include_buffers=False):
        yield


def load_strict(
    model: nn.Module,
    specs: Iterable[TensorSpec],
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Fill `model` (parameters on meta) from `specs`, which must match its state dict exactly.

    Floating tensors are cast to `dtype` (None keeps each stored dtype); integer ones keep
    theirs. Buffers outside the state dict (non-persistent) move to `device` as they are.
    A CPU tensor already at its final dtype is used as read: from safetensors, memory-mapped.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as torch.float16, got {dtype}")
    specs = list(specs)
    check_specs(model, specs, source)
    for spec in specs:
        tensor = spec.load()
        if tuple(tensor.shape) != spec.shape:  # a lying header or a buggy key map
            raise CheckpointMismatchError(source, mismatched=[(spec.name, tuple(tensor.shape), spec.shape)])
        _assign(model, spec.name, _convert(tensor, dtype, device))
    for name, buffer in list(model.named_buffers()):
        _assign(model, name, buffer.to(device))
    on_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:  # e.g. a tied parameter that the state dict lists once
        raise CheckpointMismatchError(source, missing=on_meta)
    return model


def check_specs(model: nn.Module, specs: list[TensorSpec], source: str) -> None:
    """Raise CheckpointMismatchError unless specs name exactly the model's state dict, shapes included."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    counts = Counter(spec.name for spec in specs)
    got = {spec.name: spec.shape for spec in specs}
    unexpected = [n for n in got if n not in expected]
    unexpected += [f"{n} (given {c} times)" for n, c in counts.items() if c > 1 and n in expected]
    mismatched = [(n, tuple(s), expected[n]) for n, s in got.items() if n in expected and tuple(s) != expected[n]]
    missing = [n for n in expected if n not in got]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)


def _convert(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of parameter or buffer `name` without copying it."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        requires_grad = old.requires_grad and value.is_floating_point()
        module._parameters[attr] = nn.Parameter(value, requires_grad=requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise AttributeError(f"{type(module).__name__} {module_name!r} has no parameter or buffer {attr!r}")


# --- reading checkpoint files ----------------------------------------------------


def safetensors_specs(path: str | Path) -> list[TensorSpec]:
    """Specs for a .safetensors file or a sharded `*.safetensors.index.json`; shapes come from headers."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _sharded_specs(path, allow_pickle=False)
    _require_file(path)
    f = safe_open(str(path), framework="pt")  # kept open by the closures, closed when they go
    return [TensorSpec(name, tuple(f.get_slice(name).get_shape()), _reader(f, name)) for name in f.keys()]


def pickle_specs(path: str | Path) -> list[TensorSpec]:
    """Specs for a pickled state dict, read with torch.load(weights_only=True); the caller opted in."""
    path = Path(path)
    _require_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)  # original .ckpt files nest the weights
    return [TensorSpec(name, tuple(t.shape), lambda t=t: t) for name, t in state.items() if isinstance(t, torch.Tensor)]


def checkpoint_specs(path: str | Path, allow_pickle: bool = False) -> list[TensorSpec]:
    """Specs for any supported checkpoint file; pickle formats only with allow_pickle=True."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _sharded_specs(path, allow_pickle)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeCheckpointError(str(path))
        return pickle_specs(path)
    return safetensors_specs(path)


def _sharded_specs(index_path: Path, allow_pickle: bool) -> list[TensorSpec]:
    _require_file(index_path)
    weight_map: dict[str, str] = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    specs = []
    for shard in sorted(set(weight_map.values())):
        shard_specs = checkpoint_specs(index_path.parent / shard, allow_pickle)
        listed = {name for name, file in weight_map.items() if file == shard}
        stored = {spec.name for spec in shard_specs}
        if listed != stored:
            source = f"{index_path.parent / shard} (listed in {index_path.name})"
            raise CheckpointMismatchError(source, missing=listed - stored, unexpected=stored - listed)
        specs += shard_specs
    return specs


def _reader(f, name: str) -> Callable[[], torch.Tensor]:
    return lambda: f.get_tensor(name)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint file not found: {path}")
