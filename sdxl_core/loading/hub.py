"""Model locations: a local diffusers folder, or a hub id fetched where a hub is reachable."""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # "stabilityai/stable-diffusion-xl-base-1.0"


def model_folder(path: str | Path, variant: str | None = None) -> Path:
    """`path` itself when it exists (or is not shaped like a hub id), else a hub snapshot of only what loading reads."""
    if Path(path).exists() or not HUB_ID.match(str(path)):
        return Path(path)
    from huggingface_hub import snapshot_download  # transformers' dependency; needs a reachable hub

    weights = f"*/*.{variant}.safetensors" if variant else "*/*.safetensors"
    return Path(snapshot_download(
        str(path), allow_patterns=["*.json", "*.txt", weights],
        ignore_patterns=None if variant else ["*.fp16.safetensors", "*.bf16.safetensors"]))
