"""A VAE decode one piece at a time, so that a serving engine can run other work between the pieces.

Two ways to cut it:
- by layers: the decoder's steps in turn (AutoencoderKL.decode_steps), exactly `latents_to_images`;
- by tiles, when the image is larger than `tile` pixels a side: overlapping latent tiles decoded alone and
  blended as diffusers' AutoencoderKL.tiled_decode does (diffusers 0.42.1
  models/autoencoders/autoencoder_kl.py: a quarter of the tile overlaps, linear ramps over the overlap).
  Each tile is normalised on its own, so the image differs from the whole decode (tests/core/test_decoding.py
  bounds how much); what it saves is memory, which grows with the tile, not the image.
"""

from __future__ import annotations

import torch

from sdxl_core.latents import VAE_SCALE_FACTOR
from sdxl_core.vae import AutoencoderKL, computing_vae

TILE_OVERLAP = 0.25


class Decoding:
    """Latents (B, 4, h, w) in the UNet's space -> images (B, 3, 8h, 8w) in [-1, 1], `advance` a piece at a time."""

    def __init__(self, vae: AutoencoderKL, latents: torch.Tensor, tile: int | None = None):
        self.model = computing_vae(vae)
        self.z = latents.to(device=self.model.device, dtype=self.model.dtype) / vae.config.scaling_factor
        h, w = self.z.shape[-2:]
        self.tile = tile if tile is not None and max(h, w) * VAE_SCALE_FACTOR > tile else None
        if self.tile is None:
            self.pieces, self.x = self.model.decode_steps(), self.z
        else:
            latent_tile = self.tile // VAE_SCALE_FACTOR
            stride = int(latent_tile * (1 - TILE_OVERLAP))
            self.pieces = [(i, j) for i in range(0, h, stride) for j in range(0, w, stride)]
            self.latent_tile, self.decoded = latent_tile, []
        self.done_pieces = 0

    @property
    def done(self) -> bool:
        return self.done_pieces == len(self.pieces)

    @torch.no_grad()
    def advance(self) -> None:
        """Run the next piece: a decoder step, or a tile's whole decode."""
        piece = self.pieces[self.done_pieces]
        if self.tile is None:
            self.x = piece(self.x)
        else:
            i, j = piece
            self.decoded.append(self.model.decode(self.z[:, :, i : i + self.latent_tile, j : j + self.latent_tile]))
        self.done_pieces += 1

    def images(self) -> torch.Tensor:
        """The decoded images, once done."""
        assert self.done, "the decode has pieces left"
        return self.x if self.tile is None else self._blended()

    def _blended(self) -> torch.Tensor:
        """The tiles blended into the upper and left neighbours' overlaps and cropped, as diffusers' tiled_decode."""
        blend = int(self.tile * TILE_OVERLAP)
        limit = self.tile - blend
        columns = len({j for _, j in self.pieces})
        rows = [self.decoded[k : k + columns] for k in range(0, len(self.decoded), columns)]
        out_rows = []
        for r, row in enumerate(rows):
            out = []
            for c, tile in enumerate(row):
                if r > 0:
                    tile = _blend(rows[r - 1][c], tile, blend, dim=2)
                if c > 0:
                    tile = _blend(row[c - 1], tile, blend, dim=3)
                out.append(tile[:, :, :limit, :limit])
            out_rows.append(torch.cat(out, dim=3))
        return torch.cat(out_rows, dim=2)

    def run(self) -> torch.Tensor:
        while not self.done:
            self.advance()
        return self.images()


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b with its first `extent` rows (dim 2) or columns (dim 3) ramped in from a's last ones, in place."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for k in range(extent):
        ours, theirs = b.select(dim, k), a.select(dim, a.shape[dim] - extent + k)
        ours.copy_(theirs * (1 - k / extent) + ours * (k / extent))
    return b
