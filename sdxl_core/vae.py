"""The SDXL VAE (AutoencoderKL) and the two stage functions that cross its scaling factor.

Follows diffusers 0.42.1 models/autoencoders/{autoencoder_kl,vae}.py; the state dict has
the same names and shapes, so diffusers-format weights load without a key map.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configs import VAEConfig
from .layers import Downsample2D, ResnetBlock2D, Upsample2D
from .noise import GeneratorLike, randn
from .offload import onload

EPS = 1e-6  # every norm in the VAE; diffusers' vae.py hard-codes it

def _resnets(in_channels: int, out_channels: int, count: int, config: VAEConfig) -> nn.ModuleList:
    """`count` resnets without timestep embedding; the first maps in_channels to out_channels."""
    return nn.ModuleList(
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, config.norm_num_groups, EPS)
        for i in range(count)
    )


class SelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with a residual (diffusers' VAE Attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' to_out.1 is a Dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x.flatten(2)).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    """Resnet, self-attention, resnet at the lowest resolution (diffusers' UNetMidBlock2D)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels[-1]
        self.attentions = nn.ModuleList([SelfAttention(channels, config.norm_num_groups)])
        self.resnets = _resnets(channels, channels, 2, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nn.Module):
    """`layers_per_block` resnets, then a stride-2 conv except at the last level."""

    def __init__(self, in_channels: int, out_channels: int, add_downsample: bool, config: VAEConfig):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, config.layers_per_block, config)
        # padding=0: the VAE pads right/bottom only, as it was trained.
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock(nn.Module):
    """`layers_per_block + 1` resnets, then a 2x upsample except at the last level."""

    def __init__(self, in_channels: int, out_channels: int, add_upsample: bool, config: VAEConfig):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, config.layers_per_block + 1, config)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> Gaussian moments (B, 2 * latent_channels, H/8, W/8)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock(channels[max(i - 1, 0)], channels[i], i < len(channels) - 1, config)
                for i in range(len(channels))
            ]
        )
        self.mid_block = MidBlock(config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps():
            x = step(x)
        return x

    def steps(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """forward as a chain of pieces: conv_in, every resnet and downsampler, the mid block, the head."""
        pieces = [self.conv_in]
        for block in self.down_blocks:
            pieces += [*block.resnets, *(block.downsamplers or [])]
        return pieces + [self.mid_block, lambda x: self.conv_out(F.silu(self.conv_norm_out(x)))]


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> images (B, 3, 8h, 8w)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        # Registered before mid_block, as in diffusers, so state-dict order matches too.
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock(channels[max(i - 1, 0)], channels[i], i < len(channels) - 1, config)
                for i in range(len(channels))
            ]
        )
        self.mid_block = MidBlock(config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[-1], eps=EPS)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for step in self.steps():
            z = step(z)
        return z

    def steps(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """forward as a chain of pieces, each run on the last one's output: conv_in and the mid block, every
        resnet and upsampler of the up blocks, the output head. A serving engine runs other work between them."""
        pieces = [lambda z: self.mid_block(self.conv_in(z))]
        for block in self.up_blocks:
            pieces += [*block.resnets, *(block.upsamplers or [])]
        return pieces + [lambda x: self.conv_out(F.silu(self.conv_norm_out(x)))]


class LatentDistribution:
    """Diagonal Gaussian over latents (diffusers' DiagonalGaussianDistribution)."""

    def __init__(self, moments: torch.Tensor):  # (B, 2 * latent_channels, h, w)
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: GeneratorLike = None) -> torch.Tensor:
        noise = randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """The SDXL VAE: 8x spatial compression to 4 latent channels (diffusers' AutoencoderKL)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def encode(self, images: torch.Tensor) -> LatentDistribution:
        """Images in [-1, 1], (B, 3, H, W) -> the posterior over unscaled latents (B, 4, H/8, W/8)."""
        return LatentDistribution(self.quant_conv(self.encoder(images)))

    def encode_steps(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """encode's moments as a chain of pieces (Encoder.steps)."""
        return [*self.encoder.steps(), self.quant_conv]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) -> images in [-1, 1], (B, 3, 8h, 8w)."""
        return self.decoder(self.post_quant_conv(z))

    def decode_steps(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """decode as a chain of pieces (Decoder.steps)."""
        return [self.post_quant_conv, *self.decoder.steps()]


def computing_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """The VAE to compute with: `vae`, or a float32 copy when half weights must be upcast."""
    onload(vae)  # with model CPU offload, bring the VAE to its execution device first
    if not (vae.config.force_upcast and vae.dtype in (torch.float16, torch.bfloat16)):
        return vae
    # diffusers casts the shared VAE to float32 in place and back; a request-local copy
    # instead leaves the shared VAE untouched under concurrent requests, at the price of
    # one weight cast (~0.3 GB transient at full size) per call.
    with torch.device("meta"):
        upcast = AutoencoderKL(vae.config)
    upcast.load_state_dict({k: v.float() for k, v in vae.state_dict().items()}, assign=True)
    return upcast


Pieces = Generator[None, None, Any]  # yields between pieces of model work, returns the result


def to_end(pieces: Pieces) -> Any:
    """Every piece in turn: the result, as the work done at once."""
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value


def images_to_latents_pieces(
    vae: AutoencoderKL, images: torch.Tensor, generator: GeneratorLike = None, sample: bool = True
) -> Pieces:
    """images_to_latents, yielding after each piece of the encoder (a serving engine runs other work between)."""
    model = computing_vae(vae)
    x = images.to(device=model.device, dtype=model.dtype)
    for step in model.encode_steps():
        with torch.no_grad():  # per piece: a grad mode held across a yield would leak into the caller
            x = step(x)
        yield
    posterior = LatentDistribution(x)
    latents = posterior.sample(generator) if sample else posterior.mode()
    return vae.config.scaling_factor * latents.to(images.dtype)  # (B, 4, H/8, W/8)


@torch.no_grad()
def images_to_latents(
    vae: AutoencoderKL, images: torch.Tensor, generator: GeneratorLike = None, sample: bool = True
) -> torch.Tensor:
    """Images in [-1, 1] -> latents in the UNet's space, scaled (diffusers' SDXL img2img prepare_latents)."""
    return to_end(images_to_latents_pieces(vae, images, generator, sample))


@torch.no_grad()
def latents_to_images(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the UNet's space -> images in [-1, 1] (diffusers' StableDiffusionXLPipeline.__call__)."""
    model = computing_vae(vae)
    latents = latents.to(device=model.device, dtype=model.dtype)
    return model.decode(latents / vae.config.scaling_factor)  # (B, 3, 8h, 8w)
