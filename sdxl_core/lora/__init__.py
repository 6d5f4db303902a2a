"""LoRA adapters: read from kohya / sd-scripts and diffusers / PEFT safetensors files, applied unfused per row.

`load_adapter` reads a file against the models it adapts; `applied` / `applied_rows` switch adapters on for the
forwards of the calling thread (all rows alike, or each row its own); `fuse` / `unfuse` merge them into weights.
"""

from sdxl_core.lora.adapter import LoraAdapter, LoraError, LoraLayer, load_adapter
from sdxl_core.lora.apply import Loras, applied, applied_rows, fuse, unfuse

__all__ = ["LoraAdapter", "LoraError", "LoraLayer", "Loras", "applied", "applied_rows", "fuse", "load_adapter",
           "unfuse"]
