"""Configs read from the official diffusers config.json files equal the SDXL 1.0 constants."""

import json

import pytest

from sdxl_core.configs import (
    CLIP_L,
    OPENCLIP_BIGG,
    SDXL_BASE_UNET,
    SDXL_INPAINT_UNET,
    SDXL_REFINER_UNET,
    SDXL_VAE,
    TINY_BASE_UNET,
    TINY_CLIP_L,
    TINY_INPAINT_UNET,
    TINY_OPENCLIP_BIGG,
    TINY_REFINER_UNET,
    TINY_VAE,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)


def read(reference_dir, path):
    return json.loads((reference_dir / path).read_text())


@pytest.mark.parametrize("path, cls, expected", [
    ("base/unet/config.json", UNetConfig, SDXL_BASE_UNET),
    ("refiner/unet/config.json", UNetConfig, SDXL_REFINER_UNET),
    ("base/vae/config.json", VAEConfig, SDXL_VAE),
    ("refiner/vae/config.json", VAEConfig, SDXL_VAE),
    ("base/text_encoder/config.json", TextEncoderConfig, CLIP_L),
    ("base/text_encoder_2/config.json", TextEncoderConfig, OPENCLIP_BIGG),
    ("refiner/text_encoder_2/config.json", TextEncoderConfig, OPENCLIP_BIGG),
])
def test_official_config_files_read_as_the_constants(reference_dir, path, cls, expected):
    assert cls.from_diffusers(reference_dir / path) == expected


def test_inpainting_is_the_base_with_nine_input_channels(reference_dir):
    config = read(reference_dir, "base/unet/config.json") | {"in_channels": 9}
    assert UNetConfig.from_diffusers(config) == SDXL_INPAINT_UNET
    assert SDXL_INPAINT_UNET.num_time_ids == 6


def test_refiner_and_base_are_told_apart_by_their_time_ids():
    assert SDXL_BASE_UNET.projection_class_embeddings_input_dim == 2816
    assert SDXL_REFINER_UNET.projection_class_embeddings_input_dim == 2560
    assert SDXL_REFINER_UNET.requires_aesthetics_score and not SDXL_BASE_UNET.requires_aesthetics_score


@pytest.mark.parametrize("config", [TINY_BASE_UNET, TINY_REFINER_UNET, TINY_INPAINT_UNET, SDXL_REFINER_UNET])
def test_unet_configs_survive_a_diffusers_round_trip(config):
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config


@pytest.mark.parametrize("config, cls", [(TINY_VAE, VAEConfig), (TINY_CLIP_L, TextEncoderConfig),
                                         (TINY_OPENCLIP_BIGG, TextEncoderConfig)])
def test_other_configs_survive_a_diffusers_round_trip(config, cls):
    assert cls.from_diffusers(config.to_diffusers()) == config


def test_a_unet_without_sdxl_added_conditioning_is_refused(reference_dir):
    config = read(reference_dir, "base/unet/config.json") | {"addition_embed_type": None}
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNetConfig.from_diffusers(config)


def test_up_blocks_must_mirror_down_blocks(reference_dir):
    config = read(reference_dir, "base/unet/config.json")
    config["up_block_types"] = config["up_block_types"][::-1]
    with pytest.raises(ValueError, match="do not mirror"):
        UNetConfig.from_diffusers(config)


def test_per_level_fields_must_match_the_number_of_levels():
    with pytest.raises(ValueError, match="num_attention_heads"):
        UNetConfig(num_attention_heads=(5, 10))
