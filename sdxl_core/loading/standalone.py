"""A VAE on its own, as users swap in the fp16-fixed one (diffusers' AutoencoderKL.from_pretrained / from_single_file).

`load_vae` reads a VAE folder (config.json and weights at its root, as madebyollin/sdxl-vae-fp16-fix),
a pipeline folder's vae/, a hub id of either, or one file: a VAE alone in the original layout
(sdxl_vae.safetensors: "encoder.down.0.block.0.norm1.weight", with or without "first_stage_model.")
or in diffusers' ("encoder.down_blocks.0.resnets.0.norm1.weight"), or a whole original checkpoint,
of which only the VAE is read. Folders go through folder.load_vae, original names through the
single-file VAE key map (keymaps_vae.py): one strict map per layout, as everywhere.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from sdxl_core.configs import SDXL_VAE, VAEConfig
from sdxl_core.errors import WeightsNotFoundError
from sdxl_core.loading.components import empty_vae
from sdxl_core.loading.folder import DIFFUSERS_WEIGHTS, read_config, sole_variant
from sdxl_core.loading.folder import load_vae as load_vae_folder
from sdxl_core.loading.hub import model_folder
from sdxl_core.loading.keymaps import prefixed
from sdxl_core.loading.keymaps_vae import vae_keymap
from sdxl_core.loading.single_file import VAE_PREFIX, check_tensors, detect_model_type
from sdxl_core.loading.strict import TensorSpec, checkpoint_specs, load_strict
from sdxl_core.vae import AutoencoderKL

HUB_WEIGHTS = ("diffusion_pytorch_model", "vae/diffusion_pytorch_model")  # a VAE repo's, or a pipeline repo's VAE
DIFFUSERS_BLOCKS = (".down_blocks.", ".mid_block.", ".up_blocks.")  # the original layout says .down., .mid., .up.


def load_vae(
    path: str | Path,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    config: str | Path | None = None,
) -> AutoencoderKL:
    """The VAE of a VAE folder, pipeline folder, hub id or single file; torch_dtype=None loads float32.

    Without `variant`, a folder that holds one variant only (diffusion_pytorch_model.fp16.safetensors)
    loads it. A single file has SDXL 1.0's VAE architecture and config unless, as in diffusers'
    `from_single_file(config=...)`, `config` names a VAE or pipeline folder whose VAE config describes it.
    """
    if Path(path).is_file():
        return _load_file(Path(path), torch_dtype, device, config, allow_pickle)
    root = model_folder(path, variant, weights=HUB_WEIGHTS)
    folder = vae_folder(root)
    variant = variant or sole_variant(folder, DIFFUSERS_WEIGHTS)
    return load_vae_folder(folder, torch_dtype, variant, device, allow_pickle)


def vae_folder(root: Path) -> Path:
    """The folder with the VAE's config.json: a pipeline folder's vae/, else `root` itself."""
    if not root.exists():
        raise WeightsNotFoundError(f"not found: {root} (a VAE folder, a pipeline folder, a hub id or a single file)")
    folder = root / "vae" if (root / "model_index.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(
            f"no VAE in {root}: a VAE folder has config.json and diffusion_pytorch_model.safetensors at its root, "
            f"a pipeline folder model_index.json and vae/; a single file is given by its path")
    return folder


def _load_file(path: Path, torch_dtype, device, config, allow_pickle) -> AutoencoderKL:
    source = str(path)
    specs = {spec.name: spec for spec in checkpoint_specs(path, allow_pickle)}
    prefix = VAE_PREFIX if any(name.startswith(VAE_PREFIX) for name in specs) else ""
    vae_specs = {name: spec for name, spec in specs.items() if name.startswith(prefix)}
    if len(vae_specs) < len(specs):  # a whole checkpoint: only an SDXL one holds SDXL's VAE
        detect_model_type(specs, source)
    model = empty_vae(_file_config(config))
    if config is None:
        source += " (read as SDXL 1.0's VAE; for another architecture pass config=, a folder with its config.json)"
    return load_strict(model, _model_specs(model, vae_specs, prefix, source), source,
                       torch_dtype or torch.float32, device).eval()


def _model_specs(model: AutoencoderKL, specs: dict[str, TensorSpec], prefix: str, source: str) -> list[TensorSpec]:
    """The file's tensors under the model's names: diffusers' as they are, the original ones by the key map."""
    if any(block in name for name in specs for block in DIFFUSERS_BLOCKS):
        return [replace(spec, name=name.removeprefix(prefix)) for name, spec in specs.items()]
    pairs = prefixed(vae_keymap(model.config), prefix)
    check_tensors({"vae": pairs}, {"vae": model}, specs, source)
    return [s for p in pairs for s in p.read(specs[p.original])]


def _file_config(config: str | Path | None) -> VAEConfig:
    if config is None:
        return SDXL_VAE
    folder = vae_folder(model_folder(config, weights=()))
    return read_config(folder, VAEConfig.from_diffusers)
