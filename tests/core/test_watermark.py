"""The SDXL watermark against diffusers' StableDiffusionXLWatermarker, and reading it back."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker
from PIL import Image

from sdxl_core.watermark import WATERMARK_BITS, apply_watermark, detect_watermark, watermark_available

MARKED_MIN = 0.85  # measured 0.96-1.0 on 1024x1024 (seeds 0-4), float or uint8-rounded
UNMARKED_MAX = 0.7  # measured 0.38-0.52


def _natural(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Deterministic image-like (B, 3, H, W): colour gradients plus low-frequency noise, a little past [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    gradient = torch.stack([0.6 * x, 0.5 * y, -0.2 * (x + y)])
    noise = torch.randn(batch, 3, max(height // 64, 2), max(width // 64, 2), generator=g)
    noise = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False)
    return gradient + 0.4 * noise


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, as the pipelines' postprocess rounds an output image."""
    return (image / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_watermark_available():
    assert watermark_available()


@pytest.mark.parametrize("height, width", [(256, 256), (384, 512), (512, 384), (128, 512)])
def test_apply_watermark_matches_diffusers_exactly(height, width):
    images = _natural(2, height, width)
    assert images.abs().max() > 1  # exercises the unclipped encode and the final clamp
    expected = StableDiffusionXLWatermarker().apply_watermark(images.clone())
    ours = apply_watermark(images.clone())
    assert ours.dtype == expected.dtype == torch.float32
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, images.clamp(-1, 1))


def test_apply_watermark_scales_half_precision_as_diffusers_does():
    images = _natural(1, 256, 256).half()
    expected = StableDiffusionXLWatermarker().apply_watermark(images.clone())
    assert torch.equal(apply_watermark(images.clone()), expected)


@pytest.mark.parametrize("height, width", [(255, 255), (512, 255), (1024, 128)])
def test_images_narrower_than_256_are_returned_unchanged(height, width):
    images = _natural(2, height, width)
    assert torch.equal(StableDiffusionXLWatermarker().apply_watermark(images), images)
    assert torch.equal(apply_watermark(images), images)


def test_wide_image_with_too_few_pixels_is_a_value_error():
    images = _natural(1, 128, 256)
    with pytest.raises(RuntimeError, match="too small"):  # the reference has no pixels to match here
        StableDiffusionXLWatermarker().apply_watermark(images)
    with pytest.raises(ValueError, match="128x256"):
        apply_watermark(images)


@pytest.fixture(scope="module")
def marked_and_plain() -> tuple[torch.Tensor, torch.Tensor]:
    plain = _natural(1, 1024, 1024, seed=1).clamp(-1, 1)
    return apply_watermark(plain)[0], plain[0]


def test_detect_reads_the_watermark_back_from_a_float_image(marked_and_plain):
    marked, plain = marked_and_plain
    assert detect_watermark(marked) >= MARKED_MIN
    assert detect_watermark(plain) <= UNMARKED_MAX


def test_detect_reads_the_watermark_back_after_uint8_rounding(marked_and_plain):
    marked, plain = (_to_uint8(image) for image in marked_and_plain)
    assert detect_watermark(marked) >= MARKED_MIN
    assert detect_watermark(Image.fromarray(marked)) >= MARKED_MIN
    assert detect_watermark(plain) <= UNMARKED_MAX
    assert detect_watermark(Image.fromarray(plain)) <= UNMARKED_MAX


def test_detect_counts_bits_against_the_sdxl_message(marked_and_plain, monkeypatch):
    monkeypatch.setattr("sdxl_core.watermark.WATERMARK_BITS", [1 - bit for bit in WATERMARK_BITS])
    assert detect_watermark(marked_and_plain[0]) <= 1 - MARKED_MIN


def test_detect_rejects_ambiguous_inputs():
    with pytest.raises(ValueError, match="uint8"):
        detect_watermark(np.zeros((256, 256, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        detect_watermark(torch.zeros(1, 3, 256, 256))


def test_missing_package_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "imwatermark", None)  # makes `import imwatermark` fail
    assert not watermark_available()
    with pytest.raises(ImportError, match="invisible-watermark"):
        apply_watermark(_natural(1, 256, 256))
    small = _natural(1, 64, 64)
    assert apply_watermark(small) is small


def test_sdxl_core_imports_without_the_package():
    code = (
        "import sys; sys.modules['imwatermark'] = None\n"
        "import sdxl_core.watermark as w\n"
        "assert not w.watermark_available()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
