"""UNet key map: sgm's openaimodel (input_blocks / middle_block / output_blocks) <-> diffusers' names.

Generated from the UNetConfig, so it covers the base, refiner, inpainting and tiny UNets.
Follows diffusers' convert_ldm_unet_checkpoint (diffusers/loaders/single_file_utils.py, 0.42.1),
written out per module instead of by string replacement.
"""

from __future__ import annotations

from sdxl_core.configs import UNetConfig
from sdxl_core.loading.keymaps import KeyPair, pair, weight_and_bias

# ResBlock (sgm) -> ResnetBlock2D (diffusers); "skip_connection" exists only when channels change.
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2"}

# SpatialTransformer and Transformer2DModel name their parameters alike (linear projections).
TRANSFORMER_BLOCK = (
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
)


def resnet(original: str, ours: str, in_channels: int, out_channels: int) -> list[KeyPair]:
    pairs = [p for o, m in RESNET.items() for p in weight_and_bias(f"{original}.{o}", f"{ours}.{m}")]
    if in_channels != out_channels:
        pairs += weight_and_bias(f"{original}.skip_connection", f"{ours}.conv_shortcut")
    return pairs


def transformer(original: str, ours: str, layers: int) -> list[KeyPair]:
    names = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"]
    names += [f"transformer_blocks.{i}.{p}" for i in range(layers) for p in TRANSFORMER_BLOCK]
    return [pair(f"{original}.{n}", f"{ours}.{n}") for n in names]


def unet_keymap(config: UNetConfig) -> list[KeyPair]:
    """Pairs for every UNet tensor, original names relative to "model.diffusion_model."."""
    c = config
    pairs = weight_and_bias("time_embed.0", "time_embedding.linear_1")
    pairs += weight_and_bias("time_embed.2", "time_embedding.linear_2")
    pairs += weight_and_bias("label_emb.0.0", "add_embedding.linear_1")
    pairs += weight_and_bias("label_emb.0.2", "add_embedding.linear_2")
    pairs += weight_and_bias("input_blocks.0.0", "conv_in")
    pairs += _down(c) + _middle(c) + _up(c)
    pairs += weight_and_bias("out.0", "conv_norm_out")
    pairs += weight_and_bias("out.2", "conv_out")
    return pairs


def _down(c: UNetConfig) -> list[KeyPair]:
    pairs, channels, n = [], c.block_out_channels[0], c.layers_per_block
    for level, out in enumerate(c.block_out_channels):
        for j in range(n):
            i = 1 + level * (n + 1) + j  # input_blocks.0 is conv_in; each level adds a downsampler slot
            pairs += resnet(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", channels, out)
            if c.cross_attention[level]:
                pairs += transformer(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}",
                                     c.transformer_layers_per_block[level])
            channels = out
        if level < len(c.block_out_channels) - 1:
            i = 1 + level * (n + 1) + n
            pairs += weight_and_bias(f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
    return pairs


def _middle(c: UNetConfig) -> list[KeyPair]:
    channels = c.block_out_channels[-1]
    return (resnet("middle_block.0", "mid_block.resnets.0", channels, channels)
            + transformer("middle_block.1", "mid_block.attentions.0", c.transformer_layers_per_block[-1])
            + resnet("middle_block.2", "mid_block.resnets.1", channels, channels))


def _up(c: UNetConfig) -> list[KeyPair]:
    """Output blocks mirror the input blocks; each resnet also takes the matching skip connection."""
    down_out = list(reversed(c.block_out_channels))
    cross = list(reversed(c.cross_attention))
    layers = list(reversed(c.transformer_layers_per_block))
    skips = _skip_channels(c)
    pairs, channels, n = [], down_out[0], c.layers_per_block
    for level, out in enumerate(down_out):
        for j in range(n + 1):
            i = level * (n + 1) + j
            pairs += resnet(f"output_blocks.{i}.0", f"up_blocks.{level}.resnets.{j}", channels + skips.pop(), out)
            if cross[level]:
                pairs += transformer(f"output_blocks.{i}.1", f"up_blocks.{level}.attentions.{j}", layers[level])
            channels = out
        if level < len(down_out) - 1:
            i, slot = level * (n + 1) + n, 2 if cross[level] else 1
            pairs += weight_and_bias(f"output_blocks.{i}.{slot}.conv", f"up_blocks.{level}.upsamplers.0.conv")
    return pairs


def _skip_channels(c: UNetConfig) -> list[int]:
    """Channels of every input block's output, in order; the up path pops them from the end."""
    skips = [c.block_out_channels[0]]
    for level, out in enumerate(c.block_out_channels):
        skips += [out] * c.layers_per_block
        if level < len(c.block_out_channels) - 1:
            skips.append(out)
    return skips
