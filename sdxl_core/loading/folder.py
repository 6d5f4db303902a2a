"""Load and save SDXL models in the diffusers folder layout (model_index.json, unet/, vae/, ...).

File names follow diffusers (utils/hub_utils.py `_add_variant`, models/modeling_utils.py):
`diffusion_pytorch_model[.fp16].safetensors` for unet/ and vae/, `model[.fp16].safetensors`
for the text encoders, sharded as `*.safetensors.index[.fp16].json`. Pickle `.bin` files
are read only with allow_pickle=True. As in diffusers, torch_dtype=None loads float32.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sdxl_core.configs import TextEncoderConfig, UNetConfig, VAEConfig
from sdxl_core.errors import ModelTypeMismatchError, UnknownModelTypeError, WeightsNotFoundError
from sdxl_core.loading.components import (
    SDXLComponents,
    empty_text_encoder,
    empty_unet,
    empty_vae,
    model_type,
    text_encoder_config,
)
from sdxl_core.loading.hub import model_folder
from sdxl_core.loading.strict import TensorSpec, checkpoint_specs, load_strict
from sdxl_core.tokenizers import load_tokenizer, write_tokenizer_files

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
PIPELINE_CLASSES = {
    "base": "StableDiffusionXLPipeline",
    "refiner": "StableDiffusionXLImg2ImgPipeline",
    "inpainting": "StableDiffusionXLInpaintPipeline",
}
PAD_TOKENS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


def load_components(
    path: str | Path,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
) -> SDXLComponents:
    """Every part of a diffusers SDXL folder (base, refiner or inpainting), or of a hub id's snapshot."""
    root = model_folder(path, variant)
    hint = "not a diffusers pipeline folder; for one component use load_unet, load_vae or load_text_encoder"
    index = read_json(root / "model_index.json", hint)
    listed = {name: _is_listed(index, name) for name in ("text_encoder", "tokenizer")}
    for name in ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"):
        if not _is_listed(index, name):
            raise WeightsNotFoundError(f"{root / 'model_index.json'} lists no {name!r}, which every SDXL model has")
    _check_compatible(root, index, listed["text_encoder"])

    kwargs = dict(torch_dtype=torch_dtype, variant=variant, device=device, allow_pickle=allow_pickle)
    unet = load_unet(root / "unet", **kwargs)
    return SDXLComponents(
        unet=unet,
        vae=load_vae(root / "vae", **kwargs),
        text_encoder=load_text_encoder(root / "text_encoder", **kwargs) if listed["text_encoder"] else None,
        text_encoder_2=load_text_encoder(root / "text_encoder_2", **kwargs),
        tokenizer=_load_tokenizer(root / "tokenizer") if listed["tokenizer"] else None,
        tokenizer_2=_load_tokenizer(root / "tokenizer_2"),
        scheduler_config=read_json(root / "scheduler" / "scheduler_config.json"),
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
    )


def load_unet(folder: str | Path, torch_dtype=None, variant=None, device="cpu", allow_pickle=False):
    """A UNet from a diffusers unet/ folder (config.json + weights)."""
    model = empty_unet(read_config(folder, UNetConfig.from_diffusers))
    specs, source = _read_weights(folder, DIFFUSERS_WEIGHTS, variant, allow_pickle)
    return load_strict(model, specs, source, torch_dtype or torch.float32, device).eval()


def load_vae(folder: str | Path, torch_dtype=None, variant=None, device="cpu", allow_pickle=False):
    """An AutoencoderKL from a diffusers vae/ folder; standalone.load_vae also takes a single file or hub id."""
    model = empty_vae(read_config(folder, VAEConfig.from_diffusers))
    specs, source = _read_weights(folder, DIFFUSERS_WEIGHTS, variant, allow_pickle)
    return load_strict(model, specs, source, torch_dtype or torch.float32, device).eval()


def load_text_encoder(folder: str | Path, torch_dtype=None, variant=None, device="cpu", allow_pickle=False):
    """CLIPTextModel or CLIPTextModelWithProjection from a transformers text_encoder[_2]/ folder."""
    model = empty_text_encoder(read_config(folder, TextEncoderConfig.from_diffusers))
    specs, source = _read_weights(folder, TRANSFORMERS_WEIGHTS, variant, allow_pickle)
    specs = text_encoder_specs(model, specs)
    return load_strict(model, specs, source, torch_dtype or torch.float32, device).eval()


def _read_weights(folder, names: tuple[str, str], variant, allow_pickle) -> tuple[list[TensorSpec], str]:
    weights = find_weights(Path(folder), names, variant)
    return checkpoint_specs(weights, allow_pickle), str(weights)


# The official text_encoder files (and transformers < 5.6) keep CLIPTextModel's weights under
# "text_model."; newer transformers build and save CLIPTextModel without that wrapper.


def text_encoder_specs(model: nn.Module, specs: list[TensorSpec]) -> list[TensorSpec]:
    """Rename a text encoder file's tensors to `model`'s names, whichever of the two layouts it has."""
    ours = _text_model_prefix(model)
    theirs = "text_model." if any(s.name.startswith("text_model.") for s in specs) else ""
    if ours == theirs:
        return specs
    return [s if s.name.startswith("text_projection.") else replace(s, name=ours + s.name.removeprefix(theirs))
            for s in specs]


def text_encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s tensors under the official names ("text_model.*", "text_projection.weight")."""
    prefix = "text_model." if not _text_model_prefix(model) else ""
    return {prefix + name: t for name, t in model.state_dict().items()}


def _text_model_prefix(model: nn.Module) -> str:
    return "text_model." if hasattr(model, "text_model") else ""


def read_config(folder: str | Path, from_diffusers: Callable[[dict], Any]):
    path = Path(folder) / "config.json"
    try:
        return from_diffusers(read_json(path))
    except (KeyError, ValueError) as e:  # not an SDXL component, or not one we know
        raise UnknownModelTypeError(f"{path}: {e}") from e


def _load_tokenizer(folder: Path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise WeightsNotFoundError(f"tokenizer file not found: {folder / name}")
    return load_tokenizer(folder)


def _is_listed(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and entry[0] is not None


def _check_compatible(root: Path, index: dict, has_text_encoder: bool) -> None:
    """The UNet's context must be the text encoders' hidden states, concatenated."""
    unet = read_config(root / "unet", UNetConfig.from_diffusers)
    widths = [read_config(root / "text_encoder_2", TextEncoderConfig.from_diffusers).hidden_size]
    if has_text_encoder:
        widths.insert(0, read_config(root / "text_encoder", TextEncoderConfig.from_diffusers).hidden_size)
    if sum(widths) != unet.cross_attention_dim:
        raise ModelTypeMismatchError(
            f"{root}: the UNet's cross_attention_dim is {unet.cross_attention_dim}, but the text encoders "
            f"listed in model_index.json give {' + '.join(map(str, widths))}"
        )
    wanted = index.get("requires_aesthetics_score", unet.requires_aesthetics_score)
    if wanted != unet.requires_aesthetics_score:
        raise ModelTypeMismatchError(
            f"{root / 'model_index.json'} says requires_aesthetics_score={wanted}, but the UNet takes "
            f"{unet.num_time_ids} time ids ({model_type(unet)})"
        )


def read_json(path: Path, hint: str = "") -> dict:
    if not path.is_file():
        where = "folder" if not path.parent.is_dir() else "file"
        missing = path.parent if where == "folder" else path
        raise WeightsNotFoundError(f"{where} not found: {missing}" + (f" ({hint})" if hint else ""))
    return json.loads(path.read_text(encoding="utf-8"))


# --- weight file names -------------------------------------------------------------


def add_variant(name: str, variant: str | None) -> str:
    """diffusers' naming: model.safetensors -> model.fp16.safetensors, x.index.json -> x.index.fp16.json."""
    if variant is None:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def find_weights(folder: Path, names: tuple[str, str], variant: str | None) -> Path:
    """The weight file of a component folder: safetensors first, sharded or not, then pickle."""
    if not folder.is_dir():
        raise WeightsNotFoundError(f"folder not found: {folder}")
    plain = _plain_names(names)
    candidates = [add_variant(name, variant) for name in plain]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise WeightsNotFoundError(_no_weights_message(folder, plain, candidates, variant))


def sole_variant(folder: Path, names: tuple[str, str]) -> str | None:
    """The variant a folder without plain weights holds, if it holds just one ("fp16" for
    diffusion_pytorch_model.fp16.safetensors alone); else None."""
    plain = _plain_names(names)
    if not folder.is_dir() or any((folder / name).is_file() for name in plain):
        return None
    present = {_variant_of(p.name, plain) for p in folder.iterdir()} - {None, "(none)"}
    return present.pop() if len(present) == 1 else None


def _plain_names(names: tuple[str, str]) -> list[str]:
    safetensors_name, pickle_name = names
    return [safetensors_name, f"{safetensors_name}.index.json", pickle_name, f"{pickle_name}.index.json"]


def _no_weights_message(folder: Path, plain: list[str], candidates: list[str], variant: str | None) -> str:
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".json"))
    present = {_variant_of(name, plain) for name in found} - {variant, "(none)"}
    if not present:
        return f"no weights in {folder}: looked for {', '.join(candidates)}; found {', '.join(found) or 'nothing'}"
    wanted = f"{variant} variant" if variant else candidates[0]
    hints = " or ".join(f"variant={v!r}" for v in sorted(present, key=str))
    return f"no {wanted} in {folder}: found {', '.join(found)}; pass {hints}"


def _variant_of(name: str, plain: list[str]) -> str | None:
    """None for a plain weight file, "fp16" for model.fp16.safetensors, "(none)" for other files."""
    for base in plain:
        stem, _, ext = base.rpartition(".")
        if name == base:
            return None
        if name.startswith(stem + ".") and name.endswith("." + ext) and len(name) > len(base) + 1:
            middle = name[len(stem) + 1 : -len(ext) - 1]
            if "." not in middle and "-" not in middle:  # not a shard such as model.fp16-00001-of-00002
                return middle
    return "(none)"


# --- saving --------------------------------------------------------------------------


def save_components(components: SDXLComponents, folder: str | Path, variant: str | None = None) -> Path:
    """Write `components` as a diffusers folder that diffusers and transformers load as is.

    Tensors are saved in their current dtype; `variant` only names the files, as in diffusers.
    """
    root = Path(folder)
    c = components
    _save_model(root / "unet", c.unet.config.to_diffusers(), c.unet.state_dict(), DIFFUSERS_WEIGHTS[0], variant)
    _save_model(root / "vae", c.vae.config.to_diffusers(), c.vae.state_dict(), DIFFUSERS_WEIGHTS[0], variant)
    for name in ("text_encoder", "text_encoder_2"):
        model = getattr(c, name)
        if model is not None:
            config = text_encoder_config(model).to_diffusers()
            _save_model(root / name, config, text_encoder_state_dict(model), TRANSFORMERS_WEIGHTS[0], variant)
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(c, name)
        if tokenizer is not None:
            write_tokenizer_files(root / name, str(tokenizer.pad_token))
    write_json(root / "scheduler" / "scheduler_config.json", c.scheduler_config)
    write_json(root / "model_index.json", model_index(c))
    return root


def model_index(c: SDXLComponents) -> dict:
    """model_index.json, as in stabilityai/stable-diffusion-xl-{base,refiner}-1.0."""
    def entry(library: str, obj) -> list:
        return [library, type(obj).__name__] if obj is not None else [None, None]

    index: dict[str, Any] = {
        "_class_name": PIPELINE_CLASSES[c.model_type],
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": c.force_zeros_for_empty_prompt,
        "add_watermarker": None,
    }
    if c.model_type != "base":  # StableDiffusionXLPipeline takes no such argument
        index["requires_aesthetics_score"] = c.requires_aesthetics_score
    return index | {
        "scheduler": ["diffusers", c.scheduler_config["_class_name"]],
        "text_encoder": entry("transformers", c.text_encoder),
        "text_encoder_2": entry("transformers", c.text_encoder_2),
        "tokenizer": entry("transformers", c.tokenizer),
        "tokenizer_2": entry("transformers", c.tokenizer_2),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _save_model(folder: Path, config: dict, state: dict, weights_name: str, variant: str | None) -> None:
    write_json(folder / "config.json", config)
    tensors = {name: t.contiguous() for name, t in state.items()}
    atomic_save_file(tensors, folder / add_variant(weights_name, variant))


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file via a temporary file: a model memory-mapped from `path` keeps its old bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors writes 0600; a shared model cache must be readable
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
