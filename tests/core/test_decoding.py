"""A VAE decode one piece at a time: by layers exactly the whole decode; by tiles as diffusers' tiled decode."""

import pytest
import torch

from sdxl_core.decoding import Decoding
from sdxl_core.vae import latents_to_images
from tests.core.test_vae import _half, _pair


def _latents(h, w, batch=2):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(5))


def test_layer_by_layer_equals_the_whole_decode_exactly():
    ours, _ = _pair()
    latents = _latents(12, 20)
    decoding = Decoding(ours, latents)
    assert len(decoding.pieces) > 4
    pieces = 0
    while not decoding.done:
        decoding.advance()
        pieces += 1
    assert pieces == len(decoding.pieces)
    assert torch.equal(decoding.images(), latents_to_images(ours, latents))


def test_half_weights_are_upcast_as_the_whole_decode_upcasts_them():
    half, _ = _half(_pair()[0])
    latents = _latents(8, 8)
    assert torch.equal(Decoding(half, latents).run(), latents_to_images(half, latents))


def test_a_tile_that_covers_the_image_changes_nothing():
    ours, _ = _pair()
    latents = _latents(16, 16)
    decoding = Decoding(ours, latents, tile=128)
    assert decoding.tile is None
    assert torch.equal(decoding.run(), latents_to_images(ours, latents))


@pytest.mark.parametrize("size", [(24, 24), (20, 36)])
def test_tiles_blend_as_diffusers_tiled_decode(size):
    ours, reference = _pair()
    latents = _latents(*size)
    tile = 64  # pixels: 8x8 latent tiles, 6 apart
    decoding = Decoding(ours, latents, tile=tile)
    assert len(decoding.pieces) > 4
    reference.enable_tiling()
    reference.tile_sample_min_size, reference.tile_latent_min_size = tile, tile // 8
    with torch.no_grad():
        expected = reference.decode(latents / ours.config.scaling_factor).sample
    assert torch.allclose(decoding.run(), expected, atol=1e-5)


@pytest.mark.parametrize("tile, bound", [(128, 0.05), (64, 0.15)])
def test_tiled_images_stay_close_to_the_whole_decode(tile, bound):
    """Each tile's group norms see only the tile. On the random tiny VAE over 192 x 192 pixels, tiles of 128
    pixels (2 x 2) stay within 0.05 mean absolute difference of the whole decode (measured 0.036), tiles of 64
    (4 x 4) within 0.15 (0.119); an unrelated decode differs by 0.39."""
    ours, _ = _pair()
    latents = _latents(24, 24, batch=1)
    whole = latents_to_images(ours, latents)
    tiled = Decoding(ours, latents, tile=tile).run()
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < bound


def test_an_encode_in_pieces_yields_between_them_and_equals_the_whole_encode():
    from sdxl_core.vae import images_to_latents, images_to_latents_pieces

    ours, _ = _pair()
    images = torch.rand(1, 3, 48, 64) * 2 - 1
    pieces = images_to_latents_pieces(ours, images, torch.Generator().manual_seed(4))
    yielded = 0
    while True:
        try:
            next(pieces)
            yielded += 1
        except StopIteration as done:
            latents = done.value
            break
    assert yielded == len(ours.encode_steps()) > 4
    assert torch.equal(latents, images_to_latents(ours, images, torch.Generator().manual_seed(4)))
