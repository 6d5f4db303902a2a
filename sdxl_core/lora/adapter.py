"""A loaded LoRA adapter: per adapted layer of each model, the low-rank term delta(x) = scale * up(down(x))."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdxl_core.lora.files import LoraError, RawLayer, config_scale, layer_names, metadata_config, raw_layers, read_file

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank term: down (r, in) and up (out, r) for a linear layer; for a convolution down
    (r, in, kh, kw) runs with the layer's stride and padding, up (out, r, 1, 1) after it."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank

    def down_scaled(self, x: torch.Tensor, module: nn.Module, weight: float | torch.Tensor) -> torch.Tensor:
        """down(x) * scale * weight (`weight` a float or one per row, shaped to broadcast): the rank-r inner
        activations, scaled where they are smallest."""
        if self.down.device != x.device or self.down.dtype != x.dtype:  # the model moved (.to(), CPU offload)
            object.__setattr__(self, "down", self.down.to(x.device, x.dtype))
            object.__setattr__(self, "up", self.up.to(x.device, x.dtype))
        if isinstance(module, nn.Conv2d):
            h = F.conv2d(x, self.down, stride=module.stride, padding=module.padding, dilation=module.dilation)
        else:
            h = F.linear(x, self.down)
        return h.mul_(weight * self.scale)

    def add_to(self, output: torch.Tensor, x: torch.Tensor, module: nn.Module,
               weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """output + up(down(x)) * scale * weight, in place where nothing needs the output's old value."""
        h = self.down_scaled(x, module, weight)
        if torch.is_grad_enabled():
            return output + (F.conv2d(h, self.up) if h.dim() == 4 and self.up.dim() == 4 else F.linear(h, self.up))
        if self.up.dim() == 4:
            return output.add_(F.conv2d(h, self.up))
        flat = output.view(-1, output.shape[-1])  # one GEMM that accumulates into the output
        flat.addmm_(h.reshape(-1, h.shape[-1]), self.up.t())
        return output

    def delta(self, x: torch.Tensor, module: nn.Module, weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """up(down(x)) * scale * weight, shaped as the layer's output for input x."""
        h = self.down_scaled(x, module, weight)
        return F.conv2d(h, self.up) if self.up.dim() == 4 else F.linear(h, self.up)

    def weight(self) -> torch.Tensor:
        """The term as a change of the layer's weight (up @ down * scale), for fusing."""
        if self.down.dim() == 4:
            return torch.einsum("or,rikl->oikl", self.up.flatten(1).float(), self.down.float()) * self.scale
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass(eq=False)
class LoraAdapter:
    """An adapter's layers for the models it was loaded against. Compared and hashed by identity."""

    name: str
    source: str
    layers: dict[str, dict[str, LoraLayer]]  # component -> module path -> term
    models: dict[str, weakref.ref] = field(repr=False)  # component -> the model those paths are in
    attached: dict[str, int] = field(default_factory=dict, repr=False)  # sdxl_core.lora.apply's bookkeeping

    def for_model(self, model: nn.Module) -> dict[str, LoraLayer]:
        """This adapter's terms in `model`, by module path (empty if it adapts nothing there)."""
        for component, ref in self.models.items():
            if ref() is model:
                return self.layers[component]
        return {}

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if self.layers.get(c)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layers in self.layers.values() for layer in layers.values()
                   for t in (layer.down, layer.up))


def _fitted(raw: RawLayer, module: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """down and up shaped for `module`, or LoraError naming the tensor that does not fit."""
    if raw.down is None or raw.up is None:
        have = raw.down_key or raw.up_key
        raise LoraError(f"{where}: {have} has no {'lora_up / lora_B' if raw.up is None else 'lora_down / lora_A'} "
                        "partner")
    down, up = raw.down, raw.up
    if isinstance(module, nn.Linear):
        down, up = (t.flatten(1) if t.dim() == 4 and t.shape[2:] == (1, 1) else t for t in (down, up))
        want_down, want_up = (down.shape[0], module.in_features), (module.out_features, down.shape[0])
    else:
        want_down = (down.shape[0], module.in_channels, *module.kernel_size)
        want_up = (module.out_channels, down.shape[0], 1, 1)
    for key, t, want in ((raw.down_key, down, want_down), (raw.up_key, up, want_up)):
        if tuple(t.shape) != tuple(want):
            raise LoraError(f"{where}: {key} has shape {list(t.shape)}, but the layer it adapts takes "
                            f"{list(want)}")
    return down, up


def load_adapter(path: str | Path, models: Mapping[str, nn.Module | None], name: str | None = None,
                 tensors: Mapping[str, torch.Tensor] | None = None) -> LoraAdapter:
    """Read a LoRA file (or `tensors`, a state dict in either format) against `models` ({"unet": ...,
    "text_encoder": ..., "text_encoder_2": ...}), each term in its model's dtype and on its device.

    Tensors of a component not in `models` (None: this pipeline or stage has no such model) are left out; every
    other tensor must fit a linear or convolution layer, else LoraError names it and the file.
    """
    source = str(path)
    if tensors is None:
        tensors, metadata = read_file(path)
    else:
        metadata = {}
    if not tensors:
        raise LoraError(f"{source}: holds no tensors")
    try:
        raw = raw_layers(dict(tensors))
    except LoraError as exc:
        raise LoraError(f"{source}: {exc}") from None
    layers, refs = {}, {}
    for component, by_name in raw.items():
        model = models.get(component)
        if model is None:
            continue
        names = layer_names(component, model)
        config = metadata_config(metadata, component)
        param = next(model.parameters())
        terms = {}
        for file_name, raw_layer in by_name.items():
            path_in_model = names.get(file_name)
            if path_in_model is None:
                key = raw_layer.down_key or raw_layer.up_key or file_name
                raise LoraError(f"{source}: {key} adapts no layer of the {component}")
            down, up = _fitted(raw_layer, model.get_submodule(path_in_model), source)
            rank = down.shape[0]
            if raw_layer.alpha is not None:
                scale = raw_layer.alpha / rank
            elif config is not None:
                scale = config_scale(config, path_in_model, rank)
            else:
                scale = 1.0
            if path_in_model in terms:
                raise LoraError(f"{source}: {raw_layer.down_key} adapts {path_in_model} a second time")
            terms[path_in_model] = LoraLayer(down.to(param.device, param.dtype), up.to(param.device, param.dtype),
                                             scale)
        layers[component], refs[component] = terms, weakref.ref(model)
    return LoraAdapter(name or Path(source).stem, source, layers, refs)
