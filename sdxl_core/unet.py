"""The SDXL UNet: base, refiner and 9-channel inpainting from one UNetConfig.

Follows diffusers 0.42.1 models/unets/unet_2d_condition.py (UNet2DConditionModel with
addition_embed_type="text_time") and unet_2d_blocks.py; the state dict has diffusers'
names and shapes, so diffusers-format weights load with no key map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdxl_core.attention import Transformer2DModel
from sdxl_core.conditioning import TimestepEmbedding, timestep_embedding
from sdxl_core.configs import UNetConfig
from sdxl_core.layers import Downsample2D, ResnetBlock2D, Upsample2D


class DownBlock(nn.Module):
    """One encoder level: resnets, each followed by a transformer where heads is set, then 2x down.

    diffusers' DownBlock2D (heads=None) and CrossAttnDownBlock2D.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, heads: int | None,
                 transformer_layers: int, downsample: bool, temb_channels: int, context_dim: int,
                 groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(out_channels, heads, transformer_layers, context_dim, groups)
            for _ in range(num_layers if heads else 0)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, list]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """Resnet, transformer, resnet at the lowest resolution (diffusers' UNetMidBlock2DCrossAttn)."""

    def __init__(self, channels: int, heads: int, transformer_layers: int, temb_channels: int,
                 context_dim: int, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, transformer_layers, context_dim, groups)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One decoder level: resnets over [x | skip], each followed by a transformer where heads is set, then 2x up.

    diffusers' UpBlock2D (heads=None) and CrossAttnUpBlock2D. skip_channels are in the
    order the skips are consumed (last pushed first).
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: list[int], heads: int | None,
                 transformer_layers: int, upsample: bool, temb_channels: int, context_dim: int,
                 groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((in_channels if i == 0 else out_channels) + skip, out_channels, temb_channels, groups, eps)
            for i, skip in enumerate(skip_channels)
        )
        self.attentions = nn.ModuleList(
            Transformer2DModel(out_channels, heads, transformer_layers, context_dim, groups)
            for _ in range(len(skip_channels) if heads else 0)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                upsample_size: torch.Size | None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsampler in self.upsamplers:
            x = upsampler(x, upsample_size)
        return x


class UNet(nn.Module):
    """Predicts the noise in SDXL latents from timestep, text context, pooled text and time ids."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch, last = c.block_out_channels, len(c.block_out_channels) - 1
        shared = dict(temb_channels=c.time_embed_dim, context_dim=c.cross_attention_dim,
                      groups=c.norm_num_groups, eps=c.norm_eps)
        heads = [h if cross else None for h, cross in zip(c.num_attention_heads, c.cross_attention)]

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], c.time_embed_dim)
        self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embed_dim)

        skip_channels = [ch[0]]  # channels of the skips the down path pushes, in push order
        self.down_blocks = nn.ModuleList()
        for i, out in enumerate(ch):
            self.down_blocks.append(DownBlock(
                ch[max(i - 1, 0)], out, c.layers_per_block, heads[i], c.transformer_layers_per_block[i],
                downsample=i < last, **shared))
            skip_channels += [out] * (c.layers_per_block + (i < last))

        # The mid block always has cross-attention, even where the deepest level has none (refiner).
        self.mid_block = MidBlock(ch[-1], c.num_attention_heads[-1], c.transformer_layers_per_block[-1], **shared)

        self.up_blocks = nn.ModuleList()
        prev = ch[-1]
        for i in reversed(range(len(ch))):
            n = c.layers_per_block + 1
            block_skips, skip_channels = skip_channels[-n:], skip_channels[:-n]
            self.up_blocks.append(UpBlock(
                prev, ch[i], block_skips[::-1], heads[i], c.transformer_layers_per_block[i],
                upsample=i > 0, **shared))
            prev = ch[i]

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """sample (B, C, H/8, W/8), timestep scalar or (B,), context (B, 77, D), pooled (B, P), time_ids (B, 5|6)."""
        emb = self.embed(sample, timestep, text_embeds, time_ids)  # (B, time_embed_dim)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, encoder_hidden_states)
            skips += block_skips
        x = self.mid_block(x, emb, encoder_hidden_states)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size: equals 2x when divisible, and fits odd sizes as diffusers does.
            x = block(x, block_skips, emb, encoder_hidden_states, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def embed(self, sample: torch.Tensor, timestep: torch.Tensor | float, text_embeds: torch.Tensor,
              time_ids: torch.Tensor) -> torch.Tensor:
        """Timestep embedding plus the added [pooled | embedded time ids] embedding."""
        c, B = self.config, sample.shape[0]
        if time_ids.shape[-1] != c.num_time_ids or text_embeds.shape[-1] != c.pooled_projection_dim:
            raise ValueError(
                f"this UNet takes text_embeds (B, {c.pooled_projection_dim}) and time_ids (B, {c.num_time_ids}), "
                f"got {tuple(text_embeds.shape)} and {tuple(time_ids.shape)}; build time_ids with "
                "sdxl_core.conditioning.add_time_ids for this UNet's config")
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        t_emb = timestep_embedding(t, c.block_out_channels[0]).to(sample.dtype)
        emb = self.time_embedding(t_emb)
        time_embeds = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim).reshape(B, -1)
        return emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
