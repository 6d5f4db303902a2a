"""The two sides of a denoising request that a pipeline chains and a service runs one of:
the VAE side (images -> latents) and the denoiser side (conditioning + latents -> latents).

A seeded request draws, as diffusers does from its one generator: the image's posterior samples,
the initial noise, the masked image's posterior samples (inpaint), then each step's draws
(ancestral samplers). Each side here starts from the request's generator state and skips the
other side's draws with the same torch calls (shapes, dtypes), so a stage process seeding its own
generator (DESIGN.md "Seeds") draws what the in-process pipeline draws. The pipelines run both
sides from that same state too (`fork`), so the services' path is the path diffusers is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdxl_core.configs import UNetConfig
from sdxl_core.denoise import Conditioning, Denoising, OnStep
from sdxl_core.latents import VAE_SCALE_FACTOR, noise_latents, postprocess, sample_image_latents, tile
from sdxl_core.masks import InpaintInputs, encode, masked_image, repeat_to_batch, sample_dtype
from sdxl_core.noise import GeneratorLike, randn
from sdxl_core.request import LATENT_CHANNELS, DenoisePlan, Mode, is_inpainting_unet
from sdxl_core.vae import AutoencoderKL, Pieces, latents_to_images, to_end
from sdxl_core.watermark import apply_watermark


@dataclass(frozen=True)
class Draws:
    """The posterior samples (count, 4, h, w) the VAE side drew in `dtype`: the image's before the noise,
    the masked image's after it. The denoiser side skips them."""

    image_samples: int = 0
    masked_image_samples: int = 0
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class EncodedImage:
    """What the VAE side hands the denoiser side, per image (not yet repeated to the batch)."""

    image_latents: torch.Tensor | None  # (N, 4, h, w) in the UNet's space; None when the run needs none
    mask: torch.Tensor | None = None  # (M, 1, h, w) inpaint, 1 where to repaint
    masked_image_latents: torch.Tensor | None = None  # (N', 4, h, w) for 9-channel inpainting UNets
    draws: Draws = field(default_factory=Draws)


def fork(generator: GeneratorLike) -> GeneratorLike:
    """A generator (or list) in the same state as `generator`, drawing independently of it."""
    if generator is None:
        return None
    if isinstance(generator, list):
        return [fork(g) for g in generator]
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def skip_draws(generator: GeneratorLike, count: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Advance `generator` as drawing (count, *shape) in `dtype` would; generator i of a list draws sample i."""
    if generator is None or count == 0:
        return
    # The advance depends on dtype and size (CPU normal_ fills 16 at a time for float32 only), so replay exactly.
    if isinstance(generator, list):
        for g in generator[:count]:
            torch.randn((1, *shape), generator=g, device=g.device, dtype=dtype)
    else:
        torch.randn((count, *shape), generator=generator, device=generator.device, dtype=dtype)


# --- the VAE side


def encode_image_pieces(
    vae: AutoencoderKL, image: torch.Tensor, batch_size: int, generator: GeneratorLike,
    device: torch.device, dtype: torch.dtype,
) -> Pieces:
    """img2img's VAE side: images (N, 3, H, W) in [-1, 1] -> posterior samples (N, 4, h, w); latents pass as is.
    A piece of the encoder at a time: it yields between them and returns the EncodedImage."""
    if image.shape[1] == vae.config.latent_channels:
        return EncodedImage(image.to(device=device, dtype=dtype))
    latents = yield from sample_image_latents(vae, image, batch_size, generator, device, dtype)
    return EncodedImage(latents, draws=Draws(image_samples=latents.shape[0], dtype=sample_dtype(vae)))


@torch.no_grad()
def encode_image_stage(*args, **kwargs) -> EncodedImage:
    """encode_image_pieces, all at once."""
    return to_end(encode_image_pieces(*args, **kwargs))


def encode_inpaint_pieces(
    vae: AutoencoderKL, image: torch.Tensor, mask: torch.Tensor, batch_size: int, generator: GeneratorLike,
    device: torch.device, dtype: torch.dtype, *, encode_image: bool = True, masked_image_latents: bool = False,
    given_masked_image_latents: torch.Tensor | None = None, noise_dtype: torch.dtype | None = None,
) -> Pieces:
    """Inpaint's VAE side, a piece of the encoder at a time (it yields between them, returns the EncodedImage): image (N, 3, H, W) in [-1, 1] or latents (N, 4, h, w) and mask (M, 1, H, W) ->
    image latents, the mask at latent size, and (masked_image_latents: 9-channel UNets) the masked image's latents.

    Draws as StableDiffusionXLInpaintPipeline: the image's samples (unless not `encode_image`: a 9-channel UNet
    starting from pure noise), a skip over the noise (batch_size, 4, h, w) in `noise_dtype` (the denoiser's),
    then the masked image's samples, drawn and dropped when not `masked_image_latents` (as diffusers' unused encode).
    """
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per image")
    is_latents = image.shape[1] == vae.config.latent_channels
    h, w = image.shape[-2:] if is_latents else (s // VAE_SCALE_FACTOR for s in image.shape[-2:])
    mask_latents = F.interpolate(mask, size=(h, w))  # nearest, (M, 1, h, w)
    image_samples = masked_samples = 0
    latents = None
    if is_latents:
        latents = image.to(device=device, dtype=dtype)
    elif encode_image:
        latents = (yield from encode(vae, image.to(device=device, dtype=dtype), generator)).to(dtype)
        image_samples = latents.shape[0]
    if given_masked_image_latents is not None or is_latents:
        masked = given_masked_image_latents
    else:
        skip_draws(generator, batch_size, (LATENT_CHANNELS, h, w), noise_dtype or dtype)
        source = masked_image(image, mask).to(device=device, dtype=dtype)  # (N', 3, H, W)
        masked_samples = source.shape[0]
        if masked_image_latents:
            masked = (yield from encode(vae, source, generator)).to(dtype)
        else:
            skip_draws(generator, masked_samples, (vae.config.latent_channels, h, w), sample_dtype(vae))
            masked = None
    draws = Draws(image_samples, masked_samples, sample_dtype(vae))
    return EncodedImage(latents, mask_latents, masked, draws)


@torch.no_grad()
def encode_inpaint_stage(*args, **kwargs) -> EncodedImage:
    """encode_inpaint_pieces, all at once."""
    return to_end(encode_inpaint_pieces(*args, **kwargs))


# --- the denoiser side: one function per mode, each starting a run of a DenoisePlan (`*_start`, for a serving
# engine to step with others) or running it alone (`*_denoise`)


def text2img_start(
    unet_config: UNetConfig, plan: DenoisePlan, conditioning: Conditioning, generator: GeneratorLike,
    device: torch.device, dtype: torch.dtype, *, latents: torch.Tensor | None = None,
    latent_size: tuple[int, int] | None = None, on_step: OnStep | None = None,
) -> Denoising:
    """Text-to-image: the plan's steps from the given `latents`, or from noise of `latent_size` (h, w)."""
    schedule = plan.schedule
    if latents is None:
        shape = (conditioning.batch_size, LATENT_CHANNELS, *latent_size)
        latents = noise_latents(shape, schedule, generator, device, dtype)
    else:  # diffusers scales given latents by init_noise_sigma too
        latents = _as_sent(latents, device, dtype) * schedule.init_noise_sigma
    return _run(plan, latents, conditioning, generator, on_step)


def img2img_start(
    unet_config: UNetConfig, plan: DenoisePlan, conditioning: Conditioning, image: EncodedImage,
    generator: GeneratorLike, device: torch.device, dtype: torch.dtype, *, on_step: OnStep | None = None,
) -> Denoising:
    """Image-to-image: the image latents noised to the plan's start (as they are with `denoising_start`).

    Skips `image.draws` first, so a generator in the request's initial state draws as the pipeline does.
    """
    skip_draws(generator, image.draws.image_samples, _latent_shape(image), image.draws.dtype)
    latents = tile(_as_sent(image.image_latents, device, dtype), conditioning.batch_size, "image")
    if plan.add_noise:
        noise = randn(latents.shape, generator, device, dtype)
        latents = plan.schedule.sampler.add_noise(plan.schedule, latents, noise, plan.start)
    return _run(plan, latents, conditioning, generator, on_step)


def inpaint_start(
    unet_config: UNetConfig, plan: DenoisePlan, conditioning: Conditioning, image: EncodedImage,
    generator: GeneratorLike, device: torch.device, dtype: torch.dtype, *, on_step: OnStep | None = None,
) -> Denoising:
    """Inpainting: from the noised image latents, or pure noise (`plan.from_noise`), repainting under the mask.

    Skips `image.draws` first, so a generator in the request's initial state draws as the pipeline does.
    """
    B, draws, schedule = conditioning.batch_size, image.draws, plan.schedule
    skip_draws(generator, draws.image_samples, _latent_shape(image), draws.dtype)
    if image.image_latents is None and plan.needs_image_latents(unet_config.in_channels):
        raise ValueError("image latents are needed unless a 9-channel inpainting UNet starts from pure noise "
                         "(strength 1, no denoising_start)")
    known = None if image.image_latents is None else repeat_to_batch(
        _as_sent(image.image_latents, device, dtype), B, "image")
    noise = randn((B, LATENT_CHANNELS, *image.mask.shape[-2:]), generator, device, dtype)
    skip_draws(generator, draws.masked_image_samples, _latent_shape(image), draws.dtype)
    if not plan.add_noise:
        latents = known
    elif plan.from_noise:
        latents = noise * schedule.init_noise_sigma
    else:
        latents = schedule.sampler.add_noise(schedule, known, noise, plan.start)
    mask = repeat_to_batch(_as_sent(image.mask, device, dtype), B, "mask")
    inpainting_unet = is_inpainting_unet(unet_config.in_channels)
    masked = image.masked_image_latents if inpainting_unet else None
    masked = None if masked is None else repeat_to_batch(_as_sent(masked, device, dtype), B, "masked image")
    return _run(plan, latents, conditioning, generator, on_step, inpaint=InpaintInputs(mask, known, noise, masked),
                inpainting_unet=inpainting_unet)


def _run(plan: DenoisePlan, latents, conditioning: Conditioning, generator, on_step, **inpaint) -> Denoising:
    return Denoising(plan.schedule, latents, conditioning, plan.start, plan.end, plan.guidance_scale,
                     plan.guidance_rescale, generator, on_step=on_step, **inpaint)


@torch.no_grad()
def text2img_denoise(unet: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    """text2img_start's run, alone on `unet`."""
    return text2img_start(unet.config, *args, **kwargs).run(unet)


@torch.no_grad()
def img2img_denoise(unet: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    """img2img_start's run, alone on `unet`."""
    return img2img_start(unet.config, *args, **kwargs).run(unet)


@torch.no_grad()
def inpaint_denoise(unet: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    """inpaint_start's run, alone on `unet`."""
    return inpaint_start(unet.config, *args, **kwargs).run(unet)


START = {Mode.TEXT2IMG: text2img_start, Mode.IMG2IMG: img2img_start, Mode.INPAINT: inpaint_start}


def _as_sent(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`x` on device in dtype, and contiguous as it arrives over the wire: the VAE's outputs are channels-last,
    which would send the UNet's convolutions down another path (last-bit differences) in-process only."""
    return x.to(device=device, dtype=dtype).contiguous()


def _latent_shape(image: EncodedImage) -> tuple[int, int, int]:
    """(4, h, w) of one posterior sample, read off whichever latent-size tensor the image carries."""
    for x in (image.image_latents, image.mask, image.masked_image_latents):
        if x is not None:
            return (LATENT_CHANNELS, *x.shape[-2:])
    raise ValueError("image latents, a mask or masked image latents are needed to start from an image")


# --- the VAE side, after denoising


@torch.no_grad()
def decode_stage(vae: AutoencoderKL, latents: torch.Tensor, watermark: bool, output_type: str = "pil"):
    """Latents (B, 4, h, w) in the UNet's space -> images of `output_type`: VAE decode, watermark, postprocess."""
    images = latents_to_images(vae, latents)  # (B, 3, 8h, 8w) in [-1, 1]
    if watermark:
        images = apply_watermark(images)
    return postprocess(images, output_type)
