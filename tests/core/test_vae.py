"""The VAE against diffusers' AutoencoderKL with identical weights, and its fp16 upcast rule."""

import json
from dataclasses import replace

import accelerate
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch.testing import assert_close

from sdxl_core.configs import SDXL_VAE, TINY_VAE
from sdxl_core.vae import AutoencoderKL, LatentDistribution, images_to_latents, latents_to_images
from tests.oracle import REFERENCE_DIR as REFERENCE

SCALING = TINY_VAE.scaling_factor
TOL = dict(atol=1e-5, rtol=0)
# The decoder's outputs reach ~2 after many convolutions; CPU kernel choice (thread count,
# load) moves the last float32 bits by ~1e-5 there, so decode gets a little more room.
DECODE_TOL = dict(atol=5e-5, rtol=0)
SIZES = [(64, 64), (64, 96)]  # image (H, W), square and not


def _pair(config=TINY_VAE):
    """Ours and diffusers' VAE, fp32, with the same random weights."""
    torch.manual_seed(0)
    reference = DiffusersAutoencoderKL.from_config(config.to_diffusers()).eval()
    ours = AutoencoderKL(config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def _images(h, w, batch=2):
    return torch.rand(batch, 3, h, w) * 2 - 1


def _seeded(seed=7):
    return torch.Generator().manual_seed(seed)


def _half(vae, dtype=torch.float16):
    """A VAE with `vae`'s weights rounded to `dtype`, and the fp32 VAE holding those rounded weights."""
    half = AutoencoderKL(vae.config).to(dtype)
    half.load_state_dict(vae.state_dict())
    rounded = AutoencoderKL(vae.config)
    rounded.load_state_dict(half.state_dict())
    return half, rounded


class _ConvInputDtypes:
    """Records the input dtype of every Conv2d call, in any module (upcast copies included)."""

    def __enter__(self):
        self.dtypes = set()
        hook = lambda module, args: self.dtypes.add(args[0].dtype) if isinstance(module, torch.nn.Conv2d) else None
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


@pytest.mark.parametrize("h, w", SIZES)
@torch.no_grad()
def test_encode_matches_diffusers(h, w):
    ours, reference = _pair()
    images = _images(h, w)
    posterior, expected = ours.encode(images), reference.encode(images).latent_dist
    assert posterior.mean.shape == (2, 4, h // 8, w // 8)
    assert_close(posterior.mean, expected.mean, **TOL)
    assert_close(posterior.logvar, expected.logvar, **TOL)
    assert_close(posterior.std, expected.std, **TOL)
    assert_close(posterior.mode(), expected.mode(), **TOL)
    assert_close(posterior.sample(_seeded()), expected.sample(_seeded()), **TOL)


@pytest.mark.parametrize("h, w", SIZES)
@torch.no_grad()
def test_decode_matches_diffusers(h, w):
    ours, reference = _pair()
    z = torch.randn(2, 4, h // 8, w // 8)
    images = ours.decode(z)
    assert images.shape == (2, 3, h, w)
    assert_close(images, reference.decode(z).sample, **DECODE_TOL)


def test_latent_distribution_clamps_logvar_as_diffusers():
    moments = torch.randn(2, 8, 4, 6) * 100
    ours, expected = LatentDistribution(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.max() == 20.0 and ours.logvar.min() == -30.0
    assert_close(ours.logvar, expected.logvar, **TOL)
    assert_close(ours.std, expected.std, rtol=1e-6, atol=0)


def test_sample_with_one_generator_per_image_matches_diffusers():
    moments = torch.randn(2, 8, 4, 6)
    generators = lambda: [_seeded(1), _seeded(2)]
    sample = LatentDistribution(moments).sample(generators())
    assert_close(sample, DiagonalGaussianDistribution(moments).sample(generators()), **TOL)
    assert not torch.allclose(sample[0], sample[1])


def test_sample_rejects_a_generator_count_unlike_the_batch():
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        LatentDistribution(torch.randn(2, 8, 4, 4)).sample([_seeded()] * 3)


@pytest.mark.parametrize("h, w", SIZES)
@pytest.mark.parametrize("sample", [True, False])
@torch.no_grad()
def test_images_to_latents_matches_diffusers_scaled_encode(h, w, sample):
    ours, reference = _pair()
    images = _images(h, w)
    posterior = reference.encode(images).latent_dist
    expected = (posterior.sample(_seeded()) if sample else posterior.mode()) * reference.config.scaling_factor
    assert_close(images_to_latents(ours, images, _seeded(), sample=sample), expected, **TOL)


@pytest.mark.parametrize("h, w", SIZES)
@torch.no_grad()
def test_latents_to_images_matches_diffusers_unscaled_decode(h, w):
    ours, reference = _pair()
    latents = torch.randn(2, 4, h // 8, w // 8)
    expected = reference.decode(latents / reference.config.scaling_factor).sample
    assert_close(latents_to_images(ours, latents), expected, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_force_upcast_decodes_half_weights_in_float32(dtype):
    half, rounded = _half(_pair()[0], dtype)
    latents = torch.randn(1, 4, 8, 12).to(dtype)
    with _ConvInputDtypes() as seen:
        images = latents_to_images(half, latents)
    assert seen.dtypes == {torch.float32}
    assert images.dtype == torch.float32
    assert_close(images, rounded.decode(latents.float() / SCALING), **TOL)


def test_force_upcast_avoids_the_fp16_decode_overflow():
    vae, _ = _pair()
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(1e4)  # activations far beyond fp16's 65504
    half, rounded = _half(vae)
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert not half.decode(latents.half() / SCALING).isfinite().all()  # a pure fp16 decode overflows
        expected = rounded.decode(latents / SCALING)
    images = latents_to_images(half, latents)
    assert images.isfinite().all()
    assert_close(images, expected, **TOL)


@torch.no_grad()
def test_force_upcast_encodes_half_weights_in_float32():
    dtype = torch.float16  # not bf16: the scaling would be bf16 compute, which this CPU lacks
    half, rounded = _half(_pair()[0], dtype)
    images = _images(64, 96).to(dtype)
    with _ConvInputDtypes() as seen:
        latents = images_to_latents(half, images, _seeded())
    assert seen.dtypes == {torch.float32}
    # diffusers' img2img prepare_latents: encode in fp32, cast to the images' dtype, then scale.
    expected = SCALING * rounded.encode(images.float()).sample(_seeded()).to(dtype)
    assert latents.dtype == dtype
    assert_close(latents, expected, **TOL)


@torch.no_grad()
def test_without_force_upcast_fp16_weights_compute_in_fp16():
    fixed = AutoencoderKL(replace(TINY_VAE, force_upcast=False)).half()
    fixed.load_state_dict(_pair()[0].state_dict())
    latents, images = torch.randn(1, 4, 8, 8), _images(64, 64, batch=1)
    with _ConvInputDtypes() as seen:
        decoded = latents_to_images(fixed, latents)
        encoded = images_to_latents(fixed, images, _seeded())
    assert seen.dtypes == {torch.float16}
    assert decoded.dtype == torch.float16
    assert torch.equal(decoded, fixed.decode(latents.half() / SCALING))
    assert torch.equal(encoded, SCALING * fixed.encode(images.half()).sample(_seeded()).float())


def test_upcast_leaves_the_shared_vae_untouched():
    shared, _ = _half(_pair()[0])
    before = {name: (p.dtype, p.data_ptr()) for name, p in shared.named_parameters()}
    during = set()
    record = lambda module, args: during.update(p.dtype for p in shared.parameters())
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        latents_to_images(shared, torch.randn(1, 4, 8, 8))
        images_to_latents(shared, _images(64, 64, batch=1))
    finally:
        handle.remove()
    assert during == {torch.float16}  # never cast under a concurrent request
    assert {name: (p.dtype, p.data_ptr()) for name, p in shared.named_parameters()} == before


def test_full_size_state_dict_matches_diffusers_on_meta():
    config = json.loads((REFERENCE / "base" / "vae" / "config.json").read_text())
    with accelerate.init_empty_weights():
        reference = DiffusersAutoencoderKL.from_config(config)
    with torch.device("meta"):
        ours = AutoencoderKL(SDXL_VAE)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863  # reference/README.md
    shapes = lambda model: [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    assert shapes(ours) == shapes(reference)
    assert len(shapes(ours)) == 248
