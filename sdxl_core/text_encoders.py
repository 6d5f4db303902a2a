"""SDXL's text encoders: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, as transformers builds them."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .configs import TextEncoderConfig


def clip_text_config(config: TextEncoderConfig) -> CLIPTextConfig:
    """transformers' CLIPTextConfig for a text encoder, with PyTorch's fused attention."""
    # sdpa is also what diffusers gets from from_pretrained; eager agrees to ~1e-6 in fp32.
    return CLIPTextConfig.from_dict(config.to_diffusers(), attn_implementation="sdpa")


def build_text_encoder(
    config: TextEncoderConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """CLIPTextModel (CLIP-L), or CLIPTextModelWithProjection (bigG) when the config has a projection.

    Randomly initialised, in eval mode; on the meta device it holds shapes only.
    """
    cls = CLIPTextModelWithProjection if config.with_projection else CLIPTextModel
    with torch.device(device):
        model = cls(clip_text_config(config))
    return model.to(dtype=dtype).eval()
