"""LoRA files: which layer each tensor of a kohya / sd-scripts or diffusers / PEFT safetensors file adapts.

kohya names a layer by its module path with dots made underscores, after `lora_unet_` (the UNet, in sgm's
original layout, `input_blocks_4_1_...`, or diffusers', `down_blocks_1_attentions_0_...`), `lora_te1_` (CLIP-L;
also `lora_te_`) or `lora_te2_` (bigG), with `lora_down` / `lora_up` / `alpha` (scale alpha / rank). diffusers /
PEFT names it `unet.`, `text_encoder.` or `text_encoder_2.` plus the module path, with `lora_A` / `lora_B`, and
keeps alphas in the file's `lora_adapter_metadata` (a LoraConfig per component; none: scale 1) or as `.alpha`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from sdxl_core.loading.keymaps_unet import unet_keymap

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_PREFIXES = ("unet", "text_encoder", "text_encoder_2")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DIFFUSERS_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}


class LoraError(ValueError):
    """A LoRA file that cannot adapt the model: unreadable, of an unknown format, or not fitting a layer."""


@dataclass
class RawLayer:
    """One layer's tensors as the file has them: down (r, in[, kh, kw]), up (out, r[, 1, 1]), their keys."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    down_key: str = ""
    up_key: str = ""


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file (the only format read: pickle files can run code)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRA files are read as .safetensors only")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{path}: not a readable safetensors file ({exc})") from None


def layer_names(component: str, model: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may give a linear or convolution layer of `model` -> the layer's module path."""
    names = {}
    kohya = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            names[path] = path
            names[kohya + path.replace(".", "_")] = path
            if component == "text_encoder":
                names["lora_te_" + path.replace(".", "_")] = path
    if component == "unet":  # sgm's names, as the original checkpoint has them
        for ours, original in sgm_layer_names(model.config).items():
            if ours in names:
                names[kohya + original.replace(".", "_")] = ours
    return names


def sgm_layer_names(config) -> dict[str, str]:
    """The UNet's layers: diffusers' module path -> sgm's (the original checkpoint's, kohya's first layout)."""
    return {p.model[0].removesuffix(".weight"): p.original.removesuffix(".weight")
            for p in unet_keymap(config) if p.original.endswith(".weight")}


def split_key(key: str) -> tuple[str, str, str]:
    """(component, layer name as the file gives it, part: down / up / alpha); LoraError for any other tensor."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, suffix = key.partition(".")
            if suffix in _KOHYA_PARTS:
                return component, name, _KOHYA_PARTS[suffix]
            raise LoraError(f"{key}: not a LoRA tensor this loader applies (lora_down / lora_up / alpha); "
                            "LoCon's lora_mid, LoHa, LoKr and DoRA are not supported")
    component, _, rest = key.partition(".")
    if component in DIFFUSERS_PREFIXES:
        for suffix, part in _DIFFUSERS_PARTS.items():
            if rest.endswith("." + suffix):
                return component, rest.removesuffix("." + suffix), part
        raise LoraError(f"{key}: not a LoRA tensor this loader applies (lora_A / lora_B / alpha); "
                        "biases of lora_B and DoRA are not supported")
    raise LoraError(f"{key}: neither a kohya (lora_unet_, lora_te1_, lora_te2_) nor a diffusers (unet., "
                    "text_encoder., text_encoder_2.) LoRA tensor")


def raw_layers(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, RawLayer]]:
    """The file's tensors by component and layer name, each layer's down / up / alpha together."""
    layers: dict[str, dict[str, RawLayer]] = {}
    for key, tensor in tensors.items():
        component, name, part = split_key(key)
        layer = layers.setdefault(component, {}).setdefault(name, RawLayer())
        if part == "alpha":
            layer.alpha = float(tensor.float().reshape(-1)[0])
        else:
            setattr(layer, part, tensor)
            setattr(layer, f"{part}_key", key)
    return layers


def metadata_config(metadata: dict[str, str], component: str) -> dict | None:
    """diffusers' LoraConfig of a component from the file's metadata ("unet.r", "unet.lora_alpha", ...), if any."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraError(f"{METADATA_KEY} is not JSON ({exc})") from None
    prefix = component + "."
    config = {k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)} if isinstance(flat, dict) \
        else {}
    return config or None


def config_scale(config: dict, path: str, rank: int) -> float:
    """PEFT's scaling of a layer: alpha (alpha_pattern's, else lora_alpha) / rank, or / sqrt(rank) with rsLoRA."""
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
