"""Weights on disk -> models: diffusers folders, original single files, one strict loader."""

from sdxl_core.loading.components import SDXLComponents, model_type
from sdxl_core.loading.folder import load_components, load_text_encoder, load_unet, save_components
from sdxl_core.loading.single_file import load_single_file, save_single_file
from sdxl_core.loading.standalone import load_vae
from sdxl_core.loading.strict import TensorSpec, load_strict, safetensors_specs

__all__ = [
    "SDXLComponents", "TensorSpec", "load_components", "load_single_file", "load_strict", "load_text_encoder",
    "load_unet", "load_vae", "model_type", "safetensors_specs", "save_components", "save_single_file",
]
