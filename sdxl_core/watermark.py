"""SDXL's invisible watermark: invisible-watermark's dwtDct with Stability's 48-bit message.

Follows diffusers v0.42.1 pipelines/stable_diffusion_xl/watermark.py (StableDiffusionXLWatermarker)
pixel for pixel, quirks included: only the width is checked against 256, the pixels are scaled in the
input's dtype, encoded as float32 BGR without clipping, and come back as float32.
The package is imported lazily, so sdxl_core imports without it.
"""

from __future__ import annotations

import numpy as np
import torch

# Stability-AI/generative-models scripts/demo/streamlit_helpers.py@613af10, as diffusers copies it.
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = [int(bit) for bit in bin(WATERMARK_MESSAGE)[2:]]  # 48 bits, most significant first
MIN_WIDTH = 256  # narrower images are returned unmarked
MIN_AREA = 256 * 256  # imwatermark refuses images with fewer pixels


def watermark_available() -> bool:
    """Whether the invisible-watermark package (imported as `imwatermark`) can be imported."""
    try:
        import imwatermark  # noqa: F401
    except ImportError:
        return False
    return True


def _imwatermark():
    try:
        import imwatermark
    except ImportError as e:
        raise ImportError(
            "the SDXL watermark needs the invisible-watermark package (pip install invisible-watermark); "
            "install it or turn the watermark off"
        ) from e
    return imwatermark


def _check_size(height: int, width: int) -> None:
    if height * width < MIN_AREA:
        raise ValueError(
            f"a {height}x{width} image is too small for the watermark: dwtDct needs height * width >= {MIN_AREA}"
        )


def apply_watermark(images: torch.Tensor) -> torch.Tensor:
    """Embed the SDXL watermark (dwtDct, 48 bits) in decoded images (B, 3, H, W) in [-1, 1].

    Images narrower than 256 pixels are returned as they are; others come back as float32 on the
    input's device, clamped to [-1, 1].
    """
    if images.shape[-1] < MIN_WIDTH:
        return images
    _check_size(*images.shape[-2:])
    encoder = _imwatermark().WatermarkEncoder()
    encoder.set_watermark("bits", WATERMARK_BITS)
    pixels = (255 * (images / 2 + 0.5)).cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3) RGB
    bgr = pixels[..., ::-1]  # imwatermark works in OpenCV's BGR order
    marked = np.stack([encoder.encode(image, "dwtDct")[..., ::-1] for image in bgr])  # (B, H, W, 3) RGB
    marked = torch.from_numpy(marked).permute(0, 3, 1, 2)
    return torch.clamp(2 * (marked / 255 - 0.5), min=-1.0, max=1.0).to(images.device)


def detect_watermark(image) -> float:
    """Fraction of the 48 watermark bits read back from one image: about 0.5 unmarked, near 1 marked.

    `image`: a PIL image, a uint8 array (H, W, 3) RGB, or a float tensor (3, H, W) in [-1, 1].
    """
    bgr = _bgr_pixels(image)
    _check_size(*bgr.shape[:2])
    decoder = _imwatermark().WatermarkDecoder("bits", len(WATERMARK_BITS))
    bits = decoder.decode(bgr, "dwtDct")
    return float(np.mean(np.asarray(bits, dtype=bool) == np.asarray(WATERMARK_BITS, dtype=bool)))


def _bgr_pixels(image) -> np.ndarray:
    """(H, W, 3) float32 BGR in [0, 255], the encoder's input domain."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"expected a float tensor (3, H, W) in [-1, 1], got {image.dtype} {tuple(image.shape)}")
        rgb = (255 * (image / 2 + 0.5)).cpu().permute(1, 2, 0).float().numpy()
    else:
        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected a PIL image or a uint8 array (H, W, 3) RGB, got {rgb.dtype} {rgb.shape}")
    # Decode float pixels even from uint8: OpenCV's uint8 YUV conversion offsets chroma by 128 instead
    # of float's 0.5, which flips the bits the encoder hid in negative coefficients.
    return np.ascontiguousarray(rgb[..., ::-1], dtype=np.float32)
