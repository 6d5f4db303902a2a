"""Encoded images on the wire: ImageChunk streams in and out, and PIL <-> PNG bytes. No torch."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from sdxl.v1 import tensor_pb2
from sdxl_wire import CHUNK_BYTES

ImageLike = Image.Image | bytes | str | os.PathLike  # a PIL image, PNG / JPEG bytes, or a file path
ACCEPTED_FORMATS = ("PNG", "JPEG")  # what the services decode


class ChunkError(ValueError):
    """A stream of ImageChunks that does not add up to whole images."""


def to_png(image: Image.Image) -> bytes:
    """A PIL image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def from_bytes(data: bytes) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, ...) as a loaded PIL image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def open_image(data: bytes, name: str, mode: str, max_pixels: int) -> Image.Image:
    """Untrusted PNG or JPEG bytes -> a loaded PIL image in `mode`; corrupt bytes and images over `max_pixels`
    (checked from the header, before the pixels are decoded: decompression bombs) are a ValueError."""
    unreadable = ValueError(f"`{name}` is not a readable PNG or JPEG image")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Exception:  # PIL's message may name a heap address or its internals: none of it reaches the client
        raise unreadable from None
    if image.width * image.height > max_pixels:
        raise ValueError(f"`{name}` is {image.width}x{image.height} pixels, over the limit of {max_pixels} pixels")
    try:
        image.load()
        return image if image.mode == mode else image.convert(mode)
    except Exception:
        raise unreadable from None


def encode(image: ImageLike) -> bytes:
    """PNG / JPEG bytes for an image given as PIL image (encoded to PNG), bytes (as is) or a path (read)."""
    if isinstance(image, Image.Image):
        return to_png(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    raise TypeError(f"an image must be a PIL image, bytes or a path; got {type(image).__name__}")


def chunk(data: bytes, index: int = 0, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tensor_pb2.ImageChunk]:
    """One encoded image as ImageChunks: in order, total_bytes on the first (offset 0) only."""
    if not data:
        raise ValueError(f"image {index} is empty")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1; got {chunk_bytes}")
    for offset in range(0, len(data), chunk_bytes):
        yield tensor_pb2.ImageChunk(
            index=index,
            total_bytes=len(data) if offset == 0 else 0,
            offset=offset,
            data=data[offset : offset + chunk_bytes],
        )


def chunk_all(images: Iterable[bytes], chunk_bytes: int = CHUNK_BYTES) -> Iterator[tensor_pb2.ImageChunk]:
    """Several encoded images as ImageChunks with indexes 0..N-1, one image after the other."""
    for index, data in enumerate(images):
        yield from chunk(data, index, chunk_bytes)


class ImageAssembler:
    """Puts ImageChunks back together, checking order and sizes; chunks of different images may interleave."""

    def __init__(self):
        self._parts: dict[int, bytearray] = {}
        self._totals: dict[int, int] = {}

    def add(self, piece: tensor_pb2.ImageChunk) -> None:
        """Take the next chunk of image `piece.index`; raises ChunkError if it does not follow on."""
        index = piece.index
        if index not in self._parts:
            if piece.offset != 0 or piece.total_bytes == 0:
                raise ChunkError(
                    f"image {index}: the first chunk must have offset 0 and total_bytes set; "
                    f"got offset {piece.offset}, total_bytes {piece.total_bytes}"
                )
            self._parts[index] = bytearray()
            self._totals[index] = piece.total_bytes
        elif piece.total_bytes not in (0, self._totals[index]):
            raise ChunkError(f"image {index}: total_bytes changed from {self._totals[index]} to {piece.total_bytes}")
        part, total = self._parts[index], self._totals[index]
        if piece.offset != len(part):
            raise ChunkError(f"image {index}: chunk at offset {piece.offset}, expected {len(part)}")
        if len(part) + len(piece.data) > total:
            raise ChunkError(f"image {index}: {len(part) + len(piece.data)} bytes exceed total_bytes {total}")
        part.extend(piece.data)

    def __len__(self) -> int:
        return len(self._parts)

    def images(self) -> list[bytes]:
        """The whole images by index; raises ChunkError if one is incomplete or an index is missing."""
        if sorted(self._parts) != list(range(len(self._parts))):
            raise ChunkError(f"image indexes must be 0..N-1; got {sorted(self._parts)}")
        for index, part in self._parts.items():
            if len(part) != self._totals[index]:
                raise ChunkError(f"image {index}: {len(part)} of {self._totals[index]} bytes arrived")
        return [bytes(self._parts[i]) for i in range(len(self._parts))]
