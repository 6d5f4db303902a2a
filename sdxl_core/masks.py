"""Inpainting's pieces: the mask, encoding images, and denoising around the known region (sdxl_core.stages chains them).

Follows diffusers 0.42.1 pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_inpaint.py
(prepare_latents, _encode_vae_image, prepare_mask_latents and the denoising loop) and its
mask_processor, VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True).
A mask is 1 where the image is repainted, 0 where it is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from sdxl_core.latents import VAE_SCALE_FACTOR, to_tensor
from sdxl_core.noise import GeneratorLike
from sdxl_core.vae import AutoencoderKL, Pieces, images_to_latents_pieces

# --- masks in: mask_processor.preprocess


def _first(image):
    return image[0] if isinstance(image, list) and image else image


def _mask_batch(mask) -> torch.Tensor:
    """A mask array / tensor, or a list of them, -> (B, 1, H, W), reading 3-d inputs as diffusers does."""
    if isinstance(mask, torch.Tensor) and mask.ndim == 3:
        mask = mask.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    items = mask if isinstance(mask, list) else [mask]
    if isinstance(items[0], np.ndarray):
        if items[0].ndim == 3:  # (H, W, 1) is one mask, (B, H, W) a batch
            items = [m[None] if m.shape[-1] == 1 else m[..., None] for m in items]
        x = np.concatenate(items) if items[0].ndim == 4 else np.stack(items)
        x = torch.from_numpy(x if x.ndim == 4 else x[..., None]).permute(0, 3, 1, 2)
    else:
        x = torch.cat(items) if items[0].ndim == 4 else torch.stack(items)
        x = x.unsqueeze(1) if x.ndim == 3 else x
    if x.shape[1] != 1:
        raise ValueError(f"`mask_image` must have one channel, got shape {tuple(x.shape)}")
    return x.float()


def is_latents(image) -> bool:
    """A 4-channel tensor input is latents (a base's output_type="latent"), as diffusers reads it."""
    image = _first(image)
    return isinstance(image, torch.Tensor) and image.ndim >= 3 and image.shape[-3] == 4


def image_size(image) -> tuple[int, int]:
    """(height, width) in pixels of an image input: PIL, array (H, W, C), tensor (C, H, W), or latents."""
    image = _first(image)
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return tuple(image.shape[-3:-1])
    if isinstance(image, torch.Tensor) and image.ndim >= 3:
        h, w = image.shape[-2:]
        return (VAE_SCALE_FACTOR * h, VAE_SCALE_FACTOR * w) if is_latents(image) else (h, w)
    raise ValueError(f"`image` must be a PIL image, numpy array or tensor, or a list of one kind, got {image!r:.200}")


def mask_size(mask_image) -> tuple[int, int]:
    """(height, width) in pixels of a mask input: PIL, array (H, W[, 1]) / (B, H, W), tensor (H, W) / (B, [1,] H, W)."""
    if isinstance(_first(mask_image), PIL.Image.Image):
        return _first(mask_image).height, _first(mask_image).width
    if not isinstance(_first(mask_image), (np.ndarray, torch.Tensor)):
        raise ValueError(f"`mask_image` must be a PIL image, numpy array or tensor, got {mask_image!r:.200}")
    return tuple(_mask_batch(mask_image).shape[-2:])


def check_mask_matches(image, mask_image) -> None:
    """The mask must cover the image pixel for pixel (latents count as 8x their size)."""
    (h, w), (mh, mw) = image_size(image), mask_size(mask_image)
    if (h, w) != (mh, mw):
        raise ValueError(f"`image` is {h}x{w} (height x width) but `mask_image` is {mh}x{mw}; "
                         f"pass a mask of the image's size")


def preprocess_mask(mask_image, height: int, width: int) -> torch.Tensor:
    """A mask input in [0, 1] -> (B, 1, height, width) float32 of 0 / 1 (threshold 0.5).

    PIL masks are resized with Lanczos and converted to grayscale; arrays and tensors resized nearest.
    """
    if isinstance(_first(mask_image), PIL.Image.Image):
        mask = to_tensor(mask_image, height, width, mode="L")
    else:
        mask = _mask_batch(mask_image)
        if tuple(mask.shape[-2:]) != (height, width):
            mask = F.interpolate(mask, size=(height, width))  # nearest
    return (mask >= 0.5).float()


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image (N, 3, H, W) with the region to repaint zeroed (0 is mid-grey in [-1, 1])."""
    return image * (mask < 0.5)


# --- latents: _encode_vae_image and the repeats of prepare_latents and prepare_mask_latents


def repeat_to_batch(x: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """(a, b) -> (a, b, a, b): diffusers' `x.repeat(batch_size // len(x), 1, 1, 1)`."""
    if batch_size % x.shape[0]:
        raise ValueError(f"cannot spread {x.shape[0]} {name}(s) over a batch of {batch_size} images; "
                         f"pass one, or a number that divides prompts * num_images_per_prompt")
    return x.repeat(batch_size // x.shape[0], 1, 1, 1)


def encode(vae: AutoencoderKL, images: torch.Tensor, generator: GeneratorLike) -> Pieces:
    """Images (N, 3, H, W) in [-1, 1] -> sampled latents (N, 4, H/8, W/8), a piece at a time; image i uses
    generator[i] of a list."""
    if not isinstance(generator, list):
        return (yield from images_to_latents_pieces(vae, images, generator))
    parts = []
    for i in range(images.shape[0]):
        parts.append((yield from images_to_latents_pieces(vae, images[i : i + 1], generator[i])))
    return torch.cat(parts)


def sample_dtype(vae: AutoencoderKL) -> torch.dtype:
    """The dtype the VAE draws its posterior samples in: float32 when half weights are upcast, else the weights'."""
    upcast = vae.config.force_upcast and vae.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if upcast else vae.dtype


# --- denoising: what StableDiffusionXLInpaintPipeline.__call__'s loop adds (sdxl_core.denoise.Denoising runs it)


@dataclass(frozen=True)
class InpaintInputs:
    """What inpainting adds to a denoising run, at latent size (B, C, h, w); None where the UNet kind needs none."""

    mask: torch.Tensor  # (B, 1, h, w), 1 where to repaint
    image_latents: torch.Tensor | None = None  # (B, 4, h, w) the known region, for 4-channel UNets
    noise: torch.Tensor | None = None  # (B, 4, h, w) brings image_latents to each step's noise level
    masked_image_latents: torch.Tensor | None = None  # (B, 4, h, w) for 9-channel inpainting UNets
