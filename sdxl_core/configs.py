"""Frozen configs for the SDXL models: full-size constants beside tiny test ones.

Full-size values are those of stabilityai/stable-diffusion-xl-{base,refiner}-1.0
(revision 462165984030d82259a11f4367a4eed129e94a7b); copies in tests/data/reference/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


def _per_level(value: Any, levels: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels


def _read_json(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class UNetConfig:
    """SDXL UNet (diffusers' UNet2DConditionModel with text_time added embedding)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    # Which down levels carry cross-attention; the up path mirrors it.
    cross_attention: tuple[bool, ...] = (False, True, True)
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    # diffusers' SDXL configs call this attention_head_dim, but use it as the head count.
    num_attention_heads: tuple[int, ...] = (5, 10, 20)
    layers_per_block: int = 2
    in_channels: int = 4  # 9 for inpainting: latents + mask + masked-image latents
    out_channels: int = 4
    cross_attention_dim: int = 2048  # CLIP-L 768 + bigG 1280
    addition_time_embed_dim: int = 256
    # 6 for the base (original_size, crops_coords_top_left, target_size),
    # 5 for the refiner (original_size, crops_coords_top_left, aesthetic_score).
    num_time_ids: int = 6
    pooled_projection_dim: int = 1280
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 128

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for name in ("cross_attention", "transformer_layers_per_block", "num_attention_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"UNetConfig.{name} needs {levels} entries, got {getattr(self, name)}")
        if self.num_time_ids not in (5, 6):
            raise ValueError(f"UNetConfig.num_time_ids must be 5 (refiner) or 6 (base), got {self.num_time_ids}")

    @property
    def projection_class_embeddings_input_dim(self) -> int:
        return self.pooled_projection_dim + self.num_time_ids * self.addition_time_embed_dim

    @property
    def requires_aesthetics_score(self) -> bool:
        return self.num_time_ids == 5

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers(cls, config: dict | str | Path) -> UNetConfig:
        """Read a diffusers unet/config.json (the SDXL subset of UNet2DConditionModel)."""
        c = config if isinstance(config, dict) else _read_json(config)
        if c.get("addition_embed_type") != "text_time":
            raise ValueError(f"not an SDXL UNet: addition_embed_type={c.get('addition_embed_type')!r}, expected 'text_time'")
        levels = len(c["block_out_channels"])
        down = c["down_block_types"]
        cross = tuple(t.startswith("CrossAttn") for t in down)
        up_cross = tuple(t.startswith("CrossAttn") for t in c["up_block_types"])
        if up_cross != cross[::-1]:
            raise ValueError(f"up_block_types {c['up_block_types']} do not mirror down_block_types {down}")
        heads = c.get("num_attention_heads") or c["attention_head_dim"]
        time_dim = c["addition_time_embed_dim"]
        total = c["projection_class_embeddings_input_dim"]
        # Refiner-type UNets are conditioned on bigG alone, so their pooled size equals
        # the context size; the base's context is CLIP-L + bigG, wider than its pooled.
        num_time_ids = 5 if total - 5 * time_dim == c["cross_attention_dim"] else 6
        return cls(
            block_out_channels=tuple(c["block_out_channels"]),
            cross_attention=cross,
            transformer_layers_per_block=_per_level(c.get("transformer_layers_per_block", 1), levels),
            num_attention_heads=_per_level(heads, levels),
            layers_per_block=c["layers_per_block"],
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            cross_attention_dim=c["cross_attention_dim"],
            addition_time_embed_dim=time_dim,
            num_time_ids=num_time_ids,
            pooled_projection_dim=total - num_time_ids * time_dim,
            norm_num_groups=c.get("norm_num_groups", 32),
            norm_eps=c.get("norm_eps", 1e-5),
            sample_size=c.get("sample_size", 128),
        )

    def to_diffusers(self) -> dict:
        """The equivalent diffusers unet/config.json."""
        return {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "attention_head_dim": list(self.num_attention_heads),
            "block_out_channels": list(self.block_out_channels),
            "center_input_sample": False,
            "cross_attention_dim": self.cross_attention_dim,
            "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in self.cross_attention],
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": self.in_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "sample_size": self.sample_size,
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(self.cross_attention)],
            "use_linear_projection": True,
        }


@dataclass(frozen=True)
class VAEConfig:
    """SDXL VAE (diffusers' AutoencoderKL)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    # The SDXL VAE overflows in fp16; an fp16-fixed VAE sets this to false.
    force_upcast: bool = True
    sample_size: int = 1024

    @classmethod
    def from_diffusers(cls, config: dict | str | Path) -> VAEConfig:
        c = config if isinstance(config, dict) else _read_json(config)
        for key in ("down_block_types", "up_block_types"):
            kinds = set(c.get(key, ()))
            if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
                raise ValueError(f"unsupported VAE {key}: {sorted(kinds)}")
        return cls(
            block_out_channels=tuple(c["block_out_channels"]),
            layers_per_block=c.get("layers_per_block", 2),
            in_channels=c.get("in_channels", 3),
            out_channels=c.get("out_channels", 3),
            latent_channels=c.get("latent_channels", 4),
            norm_num_groups=c.get("norm_num_groups", 32),
            scaling_factor=c.get("scaling_factor", 0.13025),
            force_upcast=c.get("force_upcast", True),
            sample_size=c.get("sample_size", 1024),
        )

    def to_diffusers(self) -> dict:
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "force_upcast": self.force_upcast,
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
        }


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer; built as transformers' CLIPTextModel(WithProjection)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    projection_dim: int
    # Only bigG (text_encoder_2) carries the projection that gives the pooled embedding.
    with_projection: bool
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    # eos_token_id 2 is what the official configs ship; transformers then pools at
    # argmax(input_ids), the position of <|endoftext|> (49407), as CLIP was trained.
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1

    @classmethod
    def from_diffusers(cls, config: dict | str | Path) -> TextEncoderConfig:
        c = config if isinstance(config, dict) else _read_json(config)
        arch = (c.get("architectures") or ["CLIPTextModel"])[0]
        if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise ValueError(f"unsupported text encoder architecture {arch!r}")
        return cls(
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            hidden_act=c["hidden_act"],
            projection_dim=c.get("projection_dim", c["hidden_size"]),
            with_projection=arch == "CLIPTextModelWithProjection",
            vocab_size=c.get("vocab_size", 49408),
            max_position_embeddings=c.get("max_position_embeddings", 77),
            layer_norm_eps=c.get("layer_norm_eps", 1e-5),
            bos_token_id=c.get("bos_token_id", 0),
            eos_token_id=c.get("eos_token_id", 2),
            pad_token_id=c.get("pad_token_id", 1),
        )

    def to_diffusers(self) -> dict:
        return {
            "architectures": ["CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "dropout": 0.0,
            "eos_token_id": self.eos_token_id,
            "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "clip_text_model",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "pad_token_id": self.pad_token_id,
            "projection_dim": self.projection_dim,
            "vocab_size": self.vocab_size,
        }


# --- SDXL 1.0, full size -----------------------------------------------------

SDXL_BASE_UNET = UNetConfig()
SDXL_REFINER_UNET = UNetConfig(
    block_out_channels=(384, 768, 1536, 1536),
    cross_attention=(False, True, True, False),
    transformer_layers_per_block=(4, 4, 4, 4),
    num_attention_heads=(6, 12, 24, 24),
    cross_attention_dim=1280,  # bigG only
    num_time_ids=5,
)
# diffusers/stable-diffusion-xl-1.0-inpainting-0.1: the base with masked-image inputs.
SDXL_INPAINT_UNET = replace(SDXL_BASE_UNET, in_channels=9)
SDXL_VAE = VAEConfig()
CLIP_L = TextEncoderConfig(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    hidden_act="quick_gelu", projection_dim=768, with_projection=False,
)
OPENCLIP_BIGG = TextEncoderConfig(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280, with_projection=True,
)

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (also the refiner's).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# --- tiny, random weights: tests and the embedded default model -------------------
# Same structure as the full size (3 UNet levels for the base, 4 for the refiner, an
# 8x VAE), narrow enough that a 20-step 64x64 run takes well under a second on CPU.

TINY_CLIP_L = TextEncoderConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    hidden_act="quick_gelu", projection_dim=32, with_projection=False,
)
# bigG wider than CLIP-L, as at full size: diffusers' single-file loader tells them apart by width.
TINY_OPENCLIP_BIGG = TextEncoderConfig(
    hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    hidden_act="gelu", projection_dim=48, with_projection=True,
)
TINY_BASE_UNET = UNetConfig(
    block_out_channels=(32, 64, 64),
    cross_attention=(False, True, True),
    transformer_layers_per_block=(1, 1, 2),
    num_attention_heads=(2, 4, 4),
    layers_per_block=1,
    cross_attention_dim=TINY_CLIP_L.hidden_size + TINY_OPENCLIP_BIGG.hidden_size,
    addition_time_embed_dim=8,
    pooled_projection_dim=TINY_OPENCLIP_BIGG.projection_dim,
    sample_size=8,
)
TINY_REFINER_UNET = UNetConfig(
    block_out_channels=(32, 64, 64, 64),
    cross_attention=(False, True, True, False),
    transformer_layers_per_block=(1, 1, 1, 1),
    num_attention_heads=(2, 4, 4, 4),
    layers_per_block=1,
    cross_attention_dim=TINY_OPENCLIP_BIGG.hidden_size,
    addition_time_embed_dim=8,
    num_time_ids=5,
    pooled_projection_dim=TINY_OPENCLIP_BIGG.projection_dim,
    sample_size=8,
)
TINY_INPAINT_UNET = replace(TINY_BASE_UNET, in_channels=9)
TINY_VAE = VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=64)
