"""Model locations: a local diffusers folder, or a hub id fetched where a hub is reachable."""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # "stabilityai/stable-diffusion-xl-base-1.0"
PIPELINE_WEIGHTS = ("*/*",)  # every component folder's weights; not the single files at a repo's root


def is_hub_id(path: str | Path) -> bool:
    """True when `path` names nothing on disk but is shaped like a hub id: loading it means a download."""
    return not Path(path).exists() and bool(HUB_ID.match(str(path)))


def model_folder(path: str | Path, variant: str | None = None, weights: tuple[str, ...] = PIPELINE_WEIGHTS) -> Path:
    """`path` itself unless it is a hub id (is_hub_id), else a hub snapshot of only what loading reads.

    The snapshot holds the configs, tokenizer files and the safetensors whose names, less the
    extension, match `weights` (a VAE repo such as madebyollin/sdxl-vae-fp16-fix keeps its at the root).
    """
    if not is_hub_id(path):
        return Path(path)
    from huggingface_hub import snapshot_download  # transformers' dependency; needs a reachable hub

    extension = f".{variant}.safetensors" if variant else ".safetensors"
    return Path(snapshot_download(
        str(path), allow_patterns=["*.json", "*.txt", *(stem + extension for stem in weights)],
        ignore_patterns=None if variant else ["*.fp16.safetensors", "*.bf16.safetensors"]))
