"""VAE key map: ldm's AutoencoderKL (encoder.down.N.block.M, mid.attn_1, ...) <-> diffusers' names.

Follows diffusers' convert_ldm_vae_checkpoint (diffusers/loaders/single_file_utils.py, 0.42.1).
The mid-block attention's q, k, v and proj_out are 1x1 convolutions in the original,
linear layers in diffusers.
"""

from __future__ import annotations

from sdxl_core.configs import VAEConfig
from sdxl_core.loading.keymaps import CONV_1X1, KeyPair, pair, weight_and_bias

RESNET = ("norm1", "conv1", "norm2", "conv2")
ATTENTION_LINEAR = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_keymap(config: VAEConfig) -> list[KeyPair]:
    """Pairs for every VAE tensor, original names relative to "first_stage_model."."""
    quant = weight_and_bias("quant_conv", "quant_conv") + weight_and_bias("post_quant_conv", "post_quant_conv")
    return _encoder(config) + _decoder(config) + quant


def resnet(original: str, ours: str, in_channels: int, out_channels: int) -> list[KeyPair]:
    pairs = [p for name in RESNET for p in weight_and_bias(f"{original}.{name}", f"{ours}.{name}")]
    if in_channels != out_channels:
        pairs += weight_and_bias(f"{original}.nin_shortcut", f"{ours}.conv_shortcut")
    return pairs


def attention(original: str, ours: str) -> list[KeyPair]:
    pairs = weight_and_bias(f"{original}.norm", f"{ours}.group_norm")
    for o, m in ATTENTION_LINEAR.items():
        pairs += [pair(f"{original}.{o}.weight", f"{ours}.{m}.weight", CONV_1X1),
                  pair(f"{original}.{o}.bias", f"{ours}.{m}.bias")]
    return pairs


def middle(side: str, channels: int) -> list[KeyPair]:
    return (resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", channels, channels)
            + attention(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0")
            + resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", channels, channels))


def _encoder(c: VAEConfig) -> list[KeyPair]:
    pairs = weight_and_bias("encoder.conv_in", "encoder.conv_in")
    channels, levels = c.block_out_channels[0], len(c.block_out_channels)
    for level, out in enumerate(c.block_out_channels):
        for j in range(c.layers_per_block):
            ours = f"encoder.down_blocks.{level}.resnets.{j}"
            pairs += resnet(f"encoder.down.{level}.block.{j}", ours, channels, out)
            channels = out
        if level < levels - 1:
            pairs += weight_and_bias(f"encoder.down.{level}.downsample.conv",
                                     f"encoder.down_blocks.{level}.downsamplers.0.conv")
    pairs += middle("encoder", channels)
    pairs += weight_and_bias("encoder.norm_out", "encoder.conv_norm_out")
    pairs += weight_and_bias("encoder.conv_out", "encoder.conv_out")
    return pairs


def _decoder(c: VAEConfig) -> list[KeyPair]:
    """ldm numbers the decoder's up levels from the output end; diffusers from the latent end."""
    pairs = weight_and_bias("decoder.conv_in", "decoder.conv_in")
    channels, levels = c.block_out_channels[-1], len(c.block_out_channels)
    pairs += middle("decoder", channels)
    for level, out in enumerate(reversed(c.block_out_channels)):
        ldm = levels - 1 - level
        for j in range(c.layers_per_block + 1):
            pairs += resnet(f"decoder.up.{ldm}.block.{j}", f"decoder.up_blocks.{level}.resnets.{j}", channels, out)
            channels = out
        if level < levels - 1:
            ours = f"decoder.up_blocks.{level}.upsamplers.0.conv"
            pairs += weight_and_bias(f"decoder.up.{ldm}.upsample.conv", ours)
    pairs += weight_and_bias("decoder.norm_out", "decoder.conv_norm_out")
    pairs += weight_and_bias("decoder.conv_out", "decoder.conv_out")
    return pairs
