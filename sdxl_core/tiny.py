"""Tiny random-weight SDXL models: the project's embedded default model and its test fixture.

`python -m sdxl_core.tiny OUT_DIR` writes OUT_DIR/{base,refiner,inpainting} as diffusers
folders and OUT_DIR/sd_xl_{base,refiner}_tiny.safetensors in the original single-file
layout. Weights are seeded per tensor name, so every run writes the same bytes.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import torch
from torch import nn

from sdxl_core.configs import (
    SDXL_SCHEDULER_CONFIG,
    TINY_BASE_UNET,
    TINY_CLIP_L,
    TINY_INPAINT_UNET,
    TINY_OPENCLIP_BIGG,
    TINY_REFINER_UNET,
    TINY_VAE,
)
from sdxl_core.errors import WeightsNotFoundError
from sdxl_core.loading.components import SDXLComponents, empty_text_encoder, empty_unet, empty_vae
from sdxl_core.loading.folder import PAD_TOKENS, save_components
from sdxl_core.loading.single_file import save_single_file
from sdxl_core.loading.strict import TensorSpec, load_strict
from sdxl_core.tokenizers import cache_dir, load_tokenizer, write_tokenizer_files

TINY_MODEL_NAME = "tiny-sdxl-v1"  # bump when the generated weights change
SEED = 20230726  # SDXL 1.0's release date

def random_init(model: nn.Module, seed_name: str) -> nn.Module:
    """Fill a meta model with seeded values: LeCun-normal weights, norm scales near 1, small biases.

    Every tensor gets distinct values (no all-ones norms), so a test that swaps two
    tensors in a key map fails; variances are preserved layer to layer, so activations stay O(1).
    """
    specs = [TensorSpec(name, tuple(t.shape), _sampler(f"{seed_name}/{name}", tuple(t.shape)))
             for name, t in model.state_dict().items()]
    return load_strict(model, specs, source=f"random init {seed_name!r}").eval()


def _sampler(key: str, shape: tuple[int, ...]):
    def sample() -> torch.Tensor:
        g = torch.Generator().manual_seed(SEED + zlib.crc32(key.encode()))
        noise = torch.randn(shape, generator=g)
        if len(shape) >= 2:  # linear, conv, embedding: std 1/sqrt(fan_in)
            return noise / math.sqrt(math.prod(shape[1:]))
        if key.endswith(".weight"):  # GroupNorm / LayerNorm scale
            return 1 + 0.1 * noise
        return 0.02 * noise

    return sample


def tiny_components(model_type: str) -> SDXLComponents:
    """Tiny "base", "refiner" or "inpainting" components; the VAE and bigG are shared, as in SDXL 1.0."""
    unet_config = {"base": TINY_BASE_UNET, "refiner": TINY_REFINER_UNET, "inpainting": TINY_INPAINT_UNET}[model_type]
    with_clip_l = model_type != "refiner"
    return SDXLComponents(
        unet=random_init(empty_unet(unet_config), f"unet-{model_type}"),
        vae=random_init(empty_vae(TINY_VAE), "vae"),
        text_encoder=random_init(empty_text_encoder(TINY_CLIP_L), "text_encoder") if with_clip_l else None,
        text_encoder_2=random_init(empty_text_encoder(TINY_OPENCLIP_BIGG), "text_encoder_2"),
        tokenizer=_tokenizer("tokenizer") if with_clip_l else None,
        tokenizer_2=_tokenizer("tokenizer_2"),
        scheduler_config=dict(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=model_type != "refiner",
    )


def _tokenizer(name: str):
    with tempfile.TemporaryDirectory() as tmp:
        return load_tokenizer(write_tokenizer_files(Path(tmp) / name, PAD_TOKENS[name]))


def write_tiny_models(out_dir: str | Path) -> Path:
    """Write the tiny base, refiner and inpainting folders and the two single files into out_dir."""
    out = Path(out_dir)
    for model_type in ("base", "refiner", "inpainting"):
        components = tiny_components(model_type)
        save_components(components, out / model_type)
        if model_type != "inpainting":
            save_single_file(components, out / f"sd_xl_{model_type}_tiny.safetensors")
    return out


def default_model_dir() -> Path:
    """$SDXL_MODEL_DIR, else $SDXL_CACHE_DIR/tiny-sdxl-v1 (~/.cache/sdxl/tiny-sdxl-v1)."""
    env = os.environ.get("SDXL_MODEL_DIR")
    return Path(env) if env else cache_dir() / TINY_MODEL_NAME


def ensure_tiny_model(dir: str | Path | None = None) -> Path:
    """The tiny models' folder, generated on first use; safe when processes race to create it."""
    target = Path(dir) if dir is not None else default_model_dir()
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        write_tiny_models(partial)
        try:
            os.rename(partial, target)  # atomic; fails if another process got there first
        except OSError:
            if not _complete(target):
                raise WeightsNotFoundError(f"{target} exists but holds no tiny model; remove it and retry") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _complete(folder: Path) -> bool:
    return (folder / "base" / "model_index.json").is_file()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m sdxl_core.tiny OUT_DIR", file=sys.stderr)
        return 2
    print(write_tiny_models(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
