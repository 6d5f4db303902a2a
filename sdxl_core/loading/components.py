"""The parts of an SDXL model, and each model built empty (parameters on meta) for loading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl_core.configs import TextEncoderConfig, UNetConfig, VAEConfig
from sdxl_core.errors import UnknownModelTypeError
from sdxl_core.loading.strict import meta_init
from sdxl_core.request import LATENT_CHANNELS, is_inpainting_unet
from sdxl_core.text_encoders import build_text_encoder
from sdxl_core.unet import UNet
from sdxl_core.vae import AutoencoderKL

MODEL_TYPES = ("base", "refiner", "inpainting")


@dataclass
class SDXLComponents:
    """What a diffusers SDXL folder holds; the refiner has no text_encoder / tokenizer."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | None  # CLIP ViT-L/14
    text_encoder_2: CLIPTextModelWithProjection  # OpenCLIP ViT-bigG/14
    tokenizer: CLIPTokenizer | None
    tokenizer_2: CLIPTokenizer
    scheduler_config: dict[str, Any]
    force_zeros_for_empty_prompt: bool = True  # the base's; the refiner's is False

    @property
    def requires_aesthetics_score(self) -> bool:
        """The refiner is conditioned on an aesthetic score instead of the target size."""
        return self.unet.config.requires_aesthetics_score

    @property
    def model_type(self) -> str:
        """"base", "refiner" or "inpainting", read off the UNet's config."""
        return model_type(self.unet.config)


def model_type(config: UNetConfig) -> str:
    """9 input channels make an inpainting UNet; 5 time ids (aesthetic score) a refiner."""
    if is_inpainting_unet(config.in_channels):
        return "inpainting"
    if config.in_channels != LATENT_CHANNELS:
        raise UnknownModelTypeError(f"no SDXL model type has a UNet with {config.in_channels} input channels (4 or 9)")
    return "refiner" if config.num_time_ids == 5 else "base"


def text_encoder_config(model: CLIPTextModel | CLIPTextModelWithProjection) -> TextEncoderConfig:
    """The TextEncoderConfig a transformers CLIP text model was built from."""
    return TextEncoderConfig.from_diffusers(
        {**model.config.to_dict(), "architectures": [type(model).__name__]}
    )


def empty_unet(config: UNetConfig) -> UNet:
    with meta_init():
        return UNet(config)


def empty_vae(config: VAEConfig) -> AutoencoderKL:
    with meta_init():
        return AutoencoderKL(config)


def empty_text_encoder(config: TextEncoderConfig) -> CLIPTextModel | CLIPTextModelWithProjection:
    with meta_init():  # not build_text_encoder(device="meta"), which would lose position_ids
        return build_text_encoder(config)
