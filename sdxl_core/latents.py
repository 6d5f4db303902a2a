"""Latents in and out: initial noise, image latents for img2img, image pre/postprocessing, previews.

Follows diffusers 0.42.1: prepare_latents of pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py
and _img2img.py, and VaeImageProcessor (image_processor.py) with SDXL's settings.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from sdxl_core.noise import GeneratorLike, randn
from sdxl_core.schedulers.base import Schedule
from sdxl_core.vae import AutoencoderKL, Pieces, images_to_latents_pieces

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
VAE_SCALE_FACTOR = 8  # pixels per latent, SDXL's VAE (2 ** (levels - 1))

# A fixed linear map from SDXL latents (UNet space) to RGB in [-1, 1], as ComfyUI's
# comfy/latent_formats.py SDXL previews: rows are latent channels, columns R, G, B.
LATENT_RGB_FACTORS = torch.tensor([
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
])
LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")


def noise_latents(
    shape: tuple[int, int, int, int], schedule: Schedule, generator: GeneratorLike,
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    """text2img's start (B, 4, H/8, W/8): Gaussian noise drawn as randn_tensor, times init_noise_sigma."""
    return randn(shape, generator, device, dtype) * schedule.init_noise_sigma


def tile(x: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """Repeat the whole batch to batch_size: (a, b) -> (a, b, a, b), as diffusers expands images."""
    if batch_size % x.shape[0] or x.shape[0] > batch_size:
        raise ValueError(f"cannot spread {x.shape[0]} {name}(s) over a batch of {batch_size} images; "
                         f"pass one, or as many as prompts * num_images_per_prompt")
    return torch.cat([x] * (batch_size // x.shape[0]))


def sample_image_latents(
    vae: AutoencoderKL, image: torch.Tensor, batch_size: int, generator: GeneratorLike,
    device: torch.device, dtype: torch.dtype,
) -> Pieces:
    """Images (N, 3, H, W) in [-1, 1] -> VAE latents (N, 4, H/8, W/8) sampled with `generator`, a piece at a time.

    With a list of generators the images are first tiled to the batch, one sample per generator:
    (batch_size, 4, H/8, W/8), as diffusers' img2img prepare_latents.
    """
    image = image.to(device=device, dtype=dtype)
    if isinstance(generator, list):
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per image")
        image = tile(image, batch_size, "image")
        parts = []
        for i, g in enumerate(generator):
            parts.append((yield from images_to_latents_pieces(vae, image[i : i + 1], g)))
        latents = torch.cat(parts)
    else:
        latents = yield from images_to_latents_pieces(vae, image, generator)
    return latents.to(dtype)


# --- images in: VaeImageProcessor.preprocess (resize to a multiple of 8, lanczos for PIL, nearest otherwise)

def _as_list(image) -> list:
    items = image if isinstance(image, list) else [image]
    ok = (PIL.Image.Image, np.ndarray, torch.Tensor)
    if not items or not all(isinstance(i, ok) for i in items) or len({type(i) for i in items}) > 1:
        raise ValueError(f"`image` must be a PIL image, numpy array or tensor, or a list of one kind, got {image!r:.200}")
    return items


def _default_size(height: int, width: int, want_height: int | None, want_width: int | None) -> tuple[int, int]:
    height, width = want_height or height, want_width or width
    return height - height % VAE_SCALE_FACTOR, width - width % VAE_SCALE_FACTOR


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size)  # nearest


def _pil_to_tensor(images: list[PIL.Image.Image], height, width, mode: str) -> torch.Tensor:
    size = _default_size(images[0].height, images[0].width, height, width)
    images = [i.resize(size[::-1], resample=PIL.Image.Resampling.LANCZOS) for i in images]
    # diffusers leaves the mode alone; converting only changes inputs it would reject (RGBA, L, P).
    arrays = [np.asarray(i if i.mode == mode else i.convert(mode)).astype(np.float32) / 255.0 for i in images]
    x = torch.from_numpy(np.stack(arrays))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (B, C, H, W)


def to_tensor(image, height: int | None = None, width: int | None = None, mode: str = "RGB") -> torch.Tensor:
    """PIL / numpy (H, W, C) / tensor (C, H, W), or lists or batches of them -> float (B, C, H', W') in [0, 1].

    H', W' are `height` / `width` or the image's, rounded down to a multiple of 8. Values are
    passed through, so a tensor in [-1, 1] stays so; a 4-channel tensor (latents) is returned as is.
    """
    items = _as_list(image)
    if isinstance(items[0], PIL.Image.Image):
        return _pil_to_tensor(items, height, width, mode)
    if isinstance(items[0], np.ndarray):
        x = np.concatenate(items) if items[0].ndim == 4 else np.stack(items)
        x = torch.from_numpy(x if x.ndim == 4 else x[..., None]).permute(0, 3, 1, 2)
    else:
        x = torch.cat(items) if items[0].ndim == 4 else torch.stack(items)
        if x.shape[1] == 4:
            return x
    return _resize(x, _default_size(*x.shape[-2:], height, width))


def preprocess_image(image, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """An image input -> (B, 3, H, W) in [-1, 1] for the VAE, or 4-channel latents unchanged.

    Inputs are taken to be in [0, 1]; a tensor or array with negative values is taken to be in [-1, 1] already.
    """
    x = to_tensor(image, height, width)
    if x.shape[1] == 4 or x.min() < 0:
        return x
    return 2.0 * x - 1.0


# --- images out: VaeImageProcessor.postprocess

def postprocess(images: torch.Tensor, output_type: str = "pil"):
    """Decoded images (B, 3, H, W) in [-1, 1] -> "pt" (B, 3, H, W) in [0, 1], "np" (B, H, W, 3) float32, or PIL."""
    check_output_type(output_type)
    images = (images * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [PIL.Image.fromarray(a) for a in (array * 255).round().astype("uint8")]


def preview(latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, 4, h, w) -> a rough RGB preview (B, h, w, 3) uint8 on the CPU, for progress UIs."""
    rgb = latents.detach().float().cpu().permute(0, 2, 3, 1) @ LATENT_RGB_FACTORS + LATENT_RGB_BIAS
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8)
