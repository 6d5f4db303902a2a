"""Original single-file checkpoints, as sd_xl_base_1.0.safetensors and sd_xl_refiner_1.0.safetensors.

One file holds every model under sgm's prefixes: the UNet under "model.diffusion_model.",
the VAE under "first_stage_model.", CLIP ViT-L under "conditioner.embedders.0.transformer."
(base and inpainting only) and OpenCLIP bigG under "conditioner.embedders.{1,0}.model.".
Reading and writing use the same key maps (keymaps_*.py); the model type is read off the
keys as diffusers does (diffusers/loaders/single_file_utils.py, infer_diffusers_model_type).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sdxl_core.configs import (
    CLIP_L,
    OPENCLIP_BIGG,
    SDXL_BASE_UNET,
    SDXL_INPAINT_UNET,
    SDXL_REFINER_UNET,
    SDXL_SCHEDULER_CONFIG,
    SDXL_VAE,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from sdxl_core.errors import CheckpointMismatchError, ModelTypeMismatchError, UnknownModelTypeError
from sdxl_core.loading.components import (
    SDXLComponents,
    empty_text_encoder,
    empty_unet,
    empty_vae,
    model_type,
    text_encoder_config,
)
from sdxl_core.loading.folder import PAD_TOKENS, atomic_save_file, read_json
from sdxl_core.loading.keymaps import KeyPair, prefixed
from sdxl_core.loading.keymaps_clip import clip_keymap, open_clip_keymap
from sdxl_core.loading.keymaps_unet import unet_keymap
from sdxl_core.loading.keymaps_vae import vae_keymap
from sdxl_core.loading.strict import TensorSpec, checkpoint_specs, load_strict
from sdxl_core.tokenizers import load_tokenizer, write_tokenizer_files

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_PREFIX = {"base": "conditioner.embedders.1.model.", "inpainting": "conditioner.embedders.1.model.",
                    "refiner": "conditioner.embedders.0.model."}
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"

# Tensors some original checkpoints carry that are no weights of the models we build.
IGNORED = {
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids":
        "CLIP-L's constant arange(77); transformers rebuilds it (merged files often store it corrupted)",
    "conditioner.embedders.0.model.logit_scale": "OpenCLIP's contrastive temperature; the text tower never uses it",
    "conditioner.embedders.1.model.logit_scale": "OpenCLIP's contrastive temperature; the text tower never uses it",
    "denoiser.sigmas": "sgm's noise schedule; ours comes from scheduler_config",
    **dict.fromkeys(
        ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
         "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
         "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"),
        "ldm's DDPM schedule buffers; ours comes from scheduler_config"),
}
IGNORED_PREFIXES = {
    "model_ema.": "EMA copy of the UNet from training; like diffusers (extract_ema=False) we load the live weights",
}

OFFICIAL_UNETS = {"base": SDXL_BASE_UNET, "refiner": SDXL_REFINER_UNET, "inpainting": SDXL_INPAINT_UNET}
EMPTY_MODELS = {"unet": empty_unet, "vae": empty_vae, "text_encoder": empty_text_encoder,
                "text_encoder_2": empty_text_encoder}


def load_single_file(
    path: str | Path,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    config: str | Path | None = None,
    allow_pickle: bool = False,
) -> SDXLComponents:
    """Every part of an original SDXL checkpoint; torch_dtype=None loads float32, as diffusers does.

    The architecture is SDXL 1.0's for the detected model type, or, like diffusers'
    `from_single_file(config=...)`, the one described by a diffusers folder `config`
    (its weights are not read). Every tensor of the file must map onto the models.
    """
    source = str(path)
    specs = {spec.name: spec for spec in checkpoint_specs(path, allow_pickle)}
    kind = detect_model_type(specs, source)
    configs, flags = _official_configs(kind) if config is None else _folder_configs(Path(config), kind)
    models = {"text_encoder": None} | {name: EMPTY_MODELS[name](c) for name, c in configs.items()}
    keymaps = single_file_keymaps(**models)
    check_tensors(keymaps, models, specs, source)
    for name, pairs in keymaps.items():
        model_specs = [s for p in pairs for s in p.read(specs[p.original])]
        load_strict(models[name], model_specs, f"{source} ({name})", torch_dtype or torch.float32, device).eval()
    return SDXLComponents(**models, **flags, **_tokenizers(config, kind))


def save_single_file(components: SDXLComponents, path: str | Path) -> Path:
    """Write the models in the original single-file layout of the components' model type, dtypes as they are."""
    c = components
    keymaps = single_file_keymaps(c.unet, c.vae, c.text_encoder, c.text_encoder_2)
    tensors = {}
    for name, pairs in keymaps.items():
        state = getattr(c, name).state_dict()
        unmapped = set(state) - {m for p in pairs for m in p.model}
        if unmapped:
            raise ValueError(f"{name} has tensors the {c.model_type} single-file layout lacks: {sorted(unmapped)}")
        tensors |= {p.original: p.write(state).contiguous() for p in pairs}
    atomic_save_file(tensors, Path(path))
    return Path(path)


def single_file_keymaps(
    unet: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, text_encoder_2: nn.Module,
) -> dict[str, list[KeyPair]]:
    """Key maps of each component, original names in full, for these (possibly meta) models."""
    kind = model_type(unet.config)
    if (text_encoder is None) != (kind == "refiner"):
        wanted = "no CLIP-L text_encoder" if kind == "refiner" else "a CLIP-L text_encoder"
        raise ValueError(f"the SDXL {kind} single-file layout holds {wanted}; got text_encoder={type(text_encoder)}")
    keymaps = {"unet": prefixed(unet_keymap(unet.config), UNET_PREFIX),
               "vae": prefixed(vae_keymap(vae.config), VAE_PREFIX)}
    if text_encoder is not None:
        clip = clip_keymap(text_encoder_config(text_encoder), _text_model(text_encoder))
        keymaps["text_encoder"] = prefixed(clip, CLIP_L_PREFIX)
    open_clip = open_clip_keymap(text_encoder_config(text_encoder_2), _text_model(text_encoder_2))
    keymaps["text_encoder_2"] = prefixed(open_clip, OPEN_CLIP_PREFIX[kind])
    return keymaps


def detect_model_type(specs: Mapping[str, TensorSpec], source: str) -> str:
    """"base", "refiner" or "inpainting", from where the file keeps OpenCLIP bigG and the UNet's input width.

    diffusers tests for ...embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias (base) and
    ...embedders.0.model.transformer.resblocks.9... (refiner); testing the prefixes accepts
    those files and also text encoders with fewer than 10 layers.
    """
    if any(name.startswith(OPEN_CLIP_PREFIX["base"]) for name in specs):
        conv_in = specs.get(CONV_IN)
        return "inpainting" if conv_in is not None and conv_in.shape[1:2] == (9,) else "base"
    if any(name.startswith(OPEN_CLIP_PREFIX["refiner"]) for name in specs):
        return "refiner"
    raise UnknownModelTypeError(
        f"{source} is not an SDXL single-file checkpoint: no OpenCLIP bigG tensors under "
        f"{OPEN_CLIP_PREFIX['base']!r} (base, inpainting) or {OPEN_CLIP_PREFIX['refiner']!r} (refiner), "
        f"as sd_xl_base_1.0 / sd_xl_refiner_1.0 have"
    )


def check_tensors(keymaps: Mapping[str, list[KeyPair]], models: Mapping[str, nn.Module],
                  specs: Mapping[str, TensorSpec], source: str) -> None:
    """Every tensor of the file is mapped (or known to be ignorable) and has the shape the (meta) models need.

    Errors use the file's own tensor names; the expected shape is the model's, mapped back.
    """
    mapped = {p.original: (name, p) for name, pairs in keymaps.items() for p in pairs}
    unexpected = [n for n in specs if n not in mapped and not is_ignored(n)]
    missing = [n for n in mapped if n not in specs]
    states = {name: models[name].state_dict() for name in keymaps}
    mismatched = []
    for original, (name, p) in mapped.items():
        want = tuple(p.write(states[name]).shape)
        if original in specs and tuple(specs[original].shape) != want:
            mismatched.append((original, tuple(specs[original].shape), want))
    if unexpected or missing or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)


def is_ignored(name: str) -> bool:
    return name in IGNORED or name.startswith(tuple(IGNORED_PREFIXES))


def _text_model(model: nn.Module) -> str:
    # transformers >= 5.6 builds CLIPTextModel without its text_model wrapper; diffusers checks the same.
    return "text_model." if hasattr(model, "text_model") else ""


# --- configs, tokenizers and flags -------------------------------------------------------


def _text_encoders(kind: str) -> tuple[str, ...]:
    return ("text_encoder_2",) if kind == "refiner" else ("text_encoder", "text_encoder_2")


def _official_configs(kind: str) -> tuple[dict, dict]:
    """SDXL 1.0's architecture, and what its model_index.json and scheduler_config.json say."""
    text = {"text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG}
    configs = {"unet": OFFICIAL_UNETS[kind], "vae": SDXL_VAE} | {n: text[n] for n in _text_encoders(kind)}
    return configs, dict(scheduler_config=dict(SDXL_SCHEDULER_CONFIG), force_zeros_for_empty_prompt=kind != "refiner")


def _folder_configs(root: Path, kind: str) -> tuple[dict, dict]:
    """The architecture a diffusers folder describes (its weights unread); it must be the file's model type."""
    configs = {"unet": UNetConfig.from_diffusers(read_json(root / "unet" / "config.json")),
               "vae": VAEConfig.from_diffusers(read_json(root / "vae" / "config.json"))}
    unet = configs["unet"]
    if model_type(unet) != kind:
        raise ModelTypeMismatchError(f"the checkpoint is an SDXL {kind}, but config={root} is a {model_type(unet)}")
    for name in _text_encoders(kind):
        configs[name] = TextEncoderConfig.from_diffusers(read_json(root / name / "config.json"))
    index = read_json(root / "model_index.json")
    if index.get("requires_aesthetics_score", unet.requires_aesthetics_score) != unet.requires_aesthetics_score:
        raise ModelTypeMismatchError(f"{root / 'model_index.json'}: requires_aesthetics_score disagrees with "
                                     f"its UNet's {unet.num_time_ids} time ids")
    return configs, dict(scheduler_config=read_json(root / "scheduler" / "scheduler_config.json"),
                         force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", kind != "refiner"))


def _tokenizers(folder: str | Path | None, kind: str) -> dict:
    names = ("tokenizer_2",) if kind == "refiner" else ("tokenizer", "tokenizer_2")
    if folder is not None:
        tokenizers = {n: load_tokenizer(Path(folder) / n) for n in names}
    else:  # the official files, rebuilt from open_clip's BPE merges (sdxl_core/tokenizers.py)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizers = {n: load_tokenizer(write_tokenizer_files(Path(tmp) / n, PAD_TOKENS[n])) for n in names}
    return {"tokenizer": None} | tokenizers
