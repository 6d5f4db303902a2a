"""LoRA on a pipeline, by diffusers' method names (StableDiffusionXLLoraLoaderMixin), plus per-call adapters.

Unlike diffusers, adapters stay unfused unless `fuse_lora` is called: the pipeline's active set (`set_adapters`)
applies to each call's forwards through the calling thread's context, and a call may name its own
(`loras={"name": weight}`), so threads sharing one pipeline can run different adapters at once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from sdxl_core.lora import LoraAdapter, applied, fuse, load_adapter, unfuse
from sdxl_core.lora.adapter import COMPONENTS
from sdxl_core.lora.apply import detach


def with_loras(call: Callable) -> Callable:
    """A pipeline's __call__ that also takes `loras` ({"name": weight}: this call's adapters instead of the
    active set) and diffusers' `cross_attention_kwargs` ({"scale": s} scales every adapter's weight), both
    keyword-only, and runs its text encoders and UNet under them."""
    signature = inspect.signature(call)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
             for name, annotation in (("loras", "Mapping[str, float] | None"),
                                      ("cross_attention_kwargs", "dict | None"))]

    @functools.wraps(call)
    def wrapper(self, *args, loras=None, cross_attention_kwargs=None, **kwargs):
        with self.lora_context(loras, cross_attention_kwargs):
            return call(self, *args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    return wrapper


class LoraMixin:
    """Loaded adapters by name, the active ones with their weights, and those fused into the weights."""

    _loras: dict[str, LoraAdapter]
    _active_loras: dict[str, float]
    _fused_loras: dict[str, tuple[float, tuple[str, ...]]]  # name -> (weight, components fused)
    _loras_enabled: bool

    def _init_loras(self) -> None:
        self._loras, self._active_loras, self._fused_loras, self._loras_enabled = {}, {}, {}, True

    @property
    def _lora_models(self) -> dict[str, torch.nn.Module | None]:
        return {name: getattr(self, name) for name in COMPONENTS}

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, torch.Tensor],
                          adapter_name: str | None = None) -> None:
        """Load a kohya or diffusers LoRA .safetensors file (or a state dict) into the UNet and text encoders; it
        becomes the one active adapter, at weight 1. (diffusers activates it only in the models it adapts: after
        a UNet-only adapter, its text encoders keep the previous one. Here the active set is one for all models;
        `set_adapters` makes both the same.)"""
        name = adapter_name or f"default_{len(self._loras)}"
        if name in self._loras:
            raise ValueError(f"adapter name {name!r} is already in use; pass another adapter_name")
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, Mapping):
            adapter = load_adapter(f"<state dict {name}>", self._lora_models, name, tensors=source)
        else:
            adapter = load_adapter(source, self._lora_models, name)
        self._loras[name] = adapter
        self._active_loras = {name: 1.0}

    def set_adapters(self, adapter_names: str | Sequence[str],
                     adapter_weights: float | Sequence[float | None] | None = None) -> None:
        """The adapters every call applies (unless it passes `loras=`), each at its weight (default 1.0)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, Sequence) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"adapter_weights has {len(weights)} entries, adapter_names {len(names)}")
        for weight in weights:
            if weight is not None and not isinstance(weight, (int, float)):
                raise ValueError(f"adapter weights must be numbers, got {weight!r} (per-component or per-block "
                                 "weights are not supported)")
        self._check_names(names)
        self._active_loras = {n: 1.0 if w is None else float(w) for n, w in zip(names, weights)}

    def disable_lora(self) -> None:
        """Calls apply no unfused adapter (fused ones stay in the weights) until enable_lora()."""
        self._loras_enabled = False

    def enable_lora(self) -> None:
        self._loras_enabled = True

    def get_active_adapters(self) -> list[str]:
        return list(self._active_loras)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """The loaded adapters of each component, as diffusers lists them."""
        listed = {c: [n for n, a in self._loras.items() if c in a.components] for c in COMPONENTS}
        return {c: names for c, names in listed.items() if names}

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Forget adapters (unfusing them first if fused)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for name in names:
            if name in self._fused_loras:
                weight, components = self._fused_loras.pop(name)
                unfuse({_only(self._loras[name], components): weight})
            self._active_loras.pop(name, None)
            del self._loras[name]

    def unload_lora_weights(self) -> None:
        """Every adapter out: fused ones taken out of the weights, hooks removed."""
        self.delete_adapters(list(self._loras))
        for model in self._lora_models.values():
            if model is not None:
                detach(model)

    def fuse_lora(self, components: Sequence[str] = COMPONENTS, lora_scale: float = 1.0,
                  adapter_names: Sequence[str] | None = None) -> None:
        """Add the active adapters (or `adapter_names`) at weight * lora_scale into the weights of `components`;
        calls then skip them there, as diffusers' merged layers."""
        names = list(self._active_loras if adapter_names is None else adapter_names)
        self._check_names(names)
        fused = [n for n in names if n in self._fused_loras]
        if fused:
            raise ValueError(f"adapter(s) {fused} are fused already; unfuse_lora() first")
        for name in names:
            weight = self._active_loras.get(name, 1.0) * lora_scale
            fuse({_only(self._loras[name], components): weight})
            self._fused_loras[name] = (weight, tuple(components))

    def unfuse_lora(self, components: Sequence[str] = COMPONENTS) -> None:
        """Take the fused adapters out of the weights of `components` again."""
        for name, (weight, fused) in list(self._fused_loras.items()):
            unfuse({_only(self._loras[name], [c for c in fused if c in components]): weight})
            rest = tuple(c for c in fused if c not in components)
            if rest:
                self._fused_loras[name] = (weight, rest)
            else:
                del self._fused_loras[name]

    def lora_context(self, loras: Mapping[str, float] | None, cross_attention_kwargs: dict | None):
        """The block in which a call's forwards apply its adapters: `loras` if given, else the active set (unless
        disabled), less what is fused, each weight times cross_attention_kwargs["scale"] (default 1)."""
        scale = float((cross_attention_kwargs or {}).get("scale", 1.0))
        if loras is not None:
            self._check_names(list(loras))
            chosen = dict(loras)
        else:
            chosen = self._active_loras if self._loras_enabled else {}
        terms = {}
        for name, weight in chosen.items():
            adapter = self._loras[name]
            if name in self._fused_loras:
                fused = self._fused_loras[name][1]
                adapter = _only(adapter, [c for c in adapter.components if c not in fused])
            if adapter.components:
                terms[adapter] = float(weight)
        return applied(terms, scale) if terms else nullcontext()

    def _check_names(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self._loras]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded: {sorted(self._loras)}")


def _only(adapter: LoraAdapter, components: Sequence[str]) -> LoraAdapter:
    """The adapter restricted to `components` (for fusing some models only)."""
    if set(adapter.components) <= set(components):
        return adapter
    return LoraAdapter(adapter.name, adapter.source, {c: l for c, l in adapter.layers.items() if c in components},
                       {c: r for c, r in adapter.models.items() if c in components})
