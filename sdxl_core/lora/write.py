"""Write LoRA files in the kohya / sd-scripts and diffusers / PEFT formats; random adapters for tests and benches."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sdxl_core.lora.files import METADATA_KEY, sgm_layer_names

# Layers = {component: {module path: (down, up, alpha)}}
Layers = Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]]
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' default LoRA targets of the UNet
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # ... and of the text encoders


def random_layers(models: Mapping[str, nn.Module], rank: int, seed: int, alpha: float | None = None,
                  targets: Iterable[str] = ATTENTION + TEXT_ATTENTION, std: float = 0.05) -> dict:
    """A random adapter of `rank` on every linear or convolution layer of `models` whose path ends in one of
    `targets` (a convolution's down keeps its kernel); alpha None: the rank (scale 1)."""
    generator, targets = torch.Generator().manual_seed(seed), tuple(targets)
    layers = {}
    for component, model in models.items():
        terms = {}
        for path, module in model.named_modules():
            if not (isinstance(module, (nn.Linear, nn.Conv2d)) and path.endswith(targets)):
                continue
            if isinstance(module, nn.Linear):
                down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
            else:
                down_shape = (rank, module.in_channels, *module.kernel_size)
                up_shape = (module.out_channels, rank, 1, 1)
            down = torch.randn(down_shape, generator=generator) * std
            up = torch.randn(up_shape, generator=generator) * std
            terms[path] = (down, up, float(rank if alpha is None else alpha))
        layers[component] = terms
    return layers


def kohya_tensors(layers: Layers, unet: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """sd-scripts' names; given the UNet, its layers under sgm's original names (as most published SDXL LoRAs)."""
    original = {} if unet is None else sgm_layer_names(unet.config)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for component, terms in layers.items():
        for path, (down, up, alpha) in terms.items():
            name = prefixes[component] + (original.get(path, path) if component == "unet" else path).replace(".", "_")
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(float(alpha))}
    return tensors


def diffusers_tensors(layers: Layers) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers / PEFT names, and the metadata with each component's LoraConfig (rank, alpha) as diffusers
    writes it (`save_lora_weights(..., unet_lora_adapter_metadata=...)`: keys "unet.r", "unet.lora_alpha", ...)."""
    tensors, configs = {}, {}
    for component, terms in layers.items():
        for path, (down, up, _) in terms.items():
            tensors |= {f"{component}.{path}.lora_A.weight": down, f"{component}.{path}.lora_B.weight": up}
        if terms:
            (down, _, alpha), *_ = terms.values()
            ranks = {path: down.shape[0] for path, (down, _, _) in terms.items()}
            alphas = {path: alpha for path, (_, _, alpha) in terms.items()}
            config = {"r": down.shape[0], "lora_alpha": alpha,
                      "rank_pattern": {p: r for p, r in ranks.items() if r != down.shape[0]},
                      "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha}, "target_modules": sorted(terms)}
            configs |= {f"{component}.{k}": v for k, v in config.items()}
    return tensors, {METADATA_KEY: json.dumps(configs, sort_keys=True)}


def write_lora(path: str | Path, layers: Layers, format: str = "kohya", unet: nn.Module | None = None) -> Path:
    """Save an adapter as .safetensors: format "kohya" (with `unet`: sgm's layout) or "diffusers"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "kohya":
        tensors, metadata = kohya_tensors(layers, unet), {}
    elif format == "diffusers":
        tensors, metadata = diffusers_tensors(layers)
    else:
        raise ValueError(f"format must be 'kohya' or 'diffusers', got {format!r}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt", **metadata})
    return path


def write_tiny_adapters(folder: str | Path, model_dir: str | Path | None = None) -> list[Path]:
    """Two random adapters of the tiny default model, to try --lora-dir with: tiny-papercut (kohya, UNet and
    both text encoders) and tiny-pixel (diffusers, UNet attention)."""
    from sdxl_core.loading import load_components
    from sdxl_core.tiny import ensure_tiny_model

    c = load_components(Path(ensure_tiny_model(model_dir)) / "base")
    models = {"unet": c.unet, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2}
    folder = Path(folder)
    return [write_lora(folder / "tiny-papercut.safetensors", random_layers(models, 4, seed=1, std=0.1), "kohya",
                       unet=c.unet),
            write_lora(folder / "tiny-pixel.safetensors", random_layers({"unet": c.unet}, 8, seed=2), "diffusers")]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="write random LoRA adapters of the tiny default model into a folder")
    p.add_argument("folder")
    for path in write_tiny_adapters(p.parse_args(argv).folder):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
