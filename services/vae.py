"""The VAE stage: Decode (latents -> watermarked images) and Encode (images -> latents for img2img / inpaint),
over sdxl_core.stages' decode_stage, encode_image_pieces and encode_inpaint_pieces.

An engine (services/engine.py) owns the VAE. Each iteration its worker either decodes the lead Decode call
together with the others of its latent size, as many images as a measured per-image cost justifies
(services/budget.py), or runs a piece of a large decode or of an Encode call (which draws from its own seeded
generator).
The worker hands back decoded pixels; the call's own thread watermarks them and makes the PNGs, as decode_stage
would after its VAE decode, so the model never waits on CPU work.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sdxl.v1 import stage_pb2, vae_pb2, vae_pb2_grpc
from sdxl_core.decoding import Decoding
from sdxl_core.latents import VAE_SCALE_FACTOR, postprocess, preprocess_image
from sdxl_core.loading import load_vae
from sdxl_core.masks import check_mask_matches, image_size, preprocess_mask
from sdxl_core.stages import encode_image_pieces, encode_inpaint_pieces
from sdxl_core.vae import Pieces, latents_to_images
from sdxl_core.watermark import apply_watermark, watermark_available
from sdxl_wire.images import ImageAssembler, open_image, to_png
from sdxl_wire.images import chunk as image_chunks
from sdxl_wire.tensors import (
    DTYPES,
    FLOATS,
    TensorAssembler,
    expect,
    packed_chunks,
    read_header_stream,
    to_proto_chunks,
    wire_dtype,
    wire_float_dtype,
)

from . import calls, metrics
from .budget import RowBudget, calibrate, repeated, timed
from .engine import Engine, Job, priority
from .errors import FailedPrecondition
from .server import Server, ServerOptions

SERVICE = "sdxl.v1.Vae"
add_servicer = vae_pb2_grpc.add_VaeServicer_to_server
# The engine holds this many calls at once; a waiting call holds only its latents or encoded images.
OPTIONS = ServerOptions(max_concurrency=64, max_queue=64)
MAX_IMAGES = 64  # images (or masks) per call
# Decodes up to this size run whole, and share a decode with others of their size; larger ones run a piece
# (a decoder layer, or a tile) at a time, so that small decodes take turns between their pieces.
WHOLE_DECODE_PIXELS = 512 * 512
MAX_IMAGE_PIXELS = 4096 * 4096  # per input image, checked from the header before decoding: refuses decompression bombs
MIN_IMAGE_SIDE = VAE_SCALE_FACTOR  # an input image's pixels per side: at least one latent
MAX_PIXELS = 2048 * 2048  # per image decoded or encoded (--max-pixels): bounds the work of one call
MAX_ENCODED_BYTES = 64 * 2**20  # per encoded image


@dataclass
class EncodeInputs:
    """An Encode call's messages, sorted: the header, encoded images and masks, and tensors."""

    header: vae_pb2.EncodeHeader
    images: list[bytes]
    masks: list[bytes]
    tensors: dict[str, torch.Tensor]


def read_encode(requests: Iterator[vae_pb2.EncodeRequest]) -> EncodeInputs:
    """The header (first, exactly once), then ImageChunks and TensorChunks in any order."""
    first = next(requests, None)
    if first is None or first.WhichOneof("payload") != "header":
        raise ValueError("the first EncodeRequest must carry the header")
    parts = {"image": ImageAssembler(), "mask_image": ImageAssembler()}
    tensors = TensorAssembler(names={"image", "mask_image"})
    for request in requests:
        kind = request.WhichOneof("payload")
        if kind in parts:
            piece = getattr(request, kind)
            if piece.total_bytes > MAX_ENCODED_BYTES or piece.index >= MAX_IMAGES:
                raise ValueError(f"`{kind}` {piece.index} of {piece.total_bytes} bytes is over the limits of "
                                 f"{MAX_IMAGES} images and {MAX_ENCODED_BYTES} bytes each")
            parts[kind].add(piece)
        elif kind == "chunk":
            tensors.add(request.chunk)
        else:
            raise ValueError("after the header, every EncodeRequest must carry an image, mask_image or tensor chunk")
    return EncodeInputs(first.header, parts["image"].images(), parts["mask_image"].images(), tensors.finish())


def image_inputs(inputs: EncodeInputs, name: str, mode: str):
    """The images of one field: a list of PIL images, an array (N, H, W[, 3]) in [0, 1], or None if absent;
    each image at least MIN_IMAGE_SIDE pixels a side."""
    encoded = inputs.images if name == "image" else inputs.masks
    shape = ("N", None, None, 3) if name == "image" else ("N", None, None)
    tensor = expect(inputs.tensors, name, shape, torch.uint8, required=False)
    if encoded and tensor is not None:
        raise ValueError(f"send `{name}` as encoded images or as a tensor, not both")
    if tensor is not None:
        if not 1 <= tensor.shape[0] <= MAX_IMAGES or tensor[0].numel() > MAX_IMAGE_PIXELS * 3:
            raise ValueError(f"tensor {name!r} of shape {tuple(tensor.shape)} is over the limits of {MAX_IMAGES} "
                             f"images and {MAX_IMAGE_PIXELS} pixels each")
        check_min_side(name, *tensor.shape[1:3])
        return tensor.numpy().astype(np.float32) / 255  # as an array in [0, 1] given to the pipeline
    images = [open_image(data, f"{name}[{i}]", mode, MAX_IMAGE_PIXELS) for i, data in enumerate(encoded)]
    for i, image in enumerate(images):
        check_min_side(f"{name}[{i}]", image.height, image.width)
    return images or None


def check_min_side(name: str, height: int, width: int) -> None:
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"`{name}` is {height}x{width} (height x width); images must be at least "
                         f"{MIN_IMAGE_SIDE} pixels a side")


def check_encoded_size(image, header: vae_pb2.EncodeHeader, max_pixels: int) -> None:
    """The size the images are encoded at (the header's, else the first image's rounded down to a multiple of 8)
    within max_pixels, and each side within isqrt(max_pixels): the orchestrator's square bound on what it makes."""
    if header.height:
        height, width = header.height, header.width
    else:
        height, width = (side - side % VAE_SCALE_FACTOR for side in image_size(image))
    max_side = math.isqrt(max_pixels)
    if height * width > max_pixels or max(height, width) > max_side:
        raise ValueError(f"the images would be encoded at {height}x{width} (height x width), over this stage's "
                         f"limits of {max_pixels} pixels and {max_side} a side (--max-pixels); set `height` and "
                         f"`width`, or send a smaller image")


def check_encode_header(header: vae_pb2.EncodeHeader, with_mask: bool) -> None:
    """Sizes and batch in range; ValueError names the field."""
    for name in ("height", "width"):
        value = getattr(header, name)
        if value < 0 or value % VAE_SCALE_FACTOR:
            raise ValueError(f"`{name}` must be 0 (the image's) or a multiple of {VAE_SCALE_FACTOR}, got {value}")
    if (header.height == 0) != (header.width == 0):
        raise ValueError(f"set both `height` and `width` or neither, got {header.height}x{header.width}")
    if with_mask and not 1 <= header.batch_size <= MAX_IMAGES:
        raise ValueError(f"`batch_size` must be in [1, {MAX_IMAGES}] with a mask, got {header.batch_size}")
    if not with_mask and (header.masked_image_latents or header.skip_image_latents):
        raise ValueError("`masked_image_latents` and `skip_image_latents` need a mask")


@dataclass
class DecodeWork:
    """A Decode call's latents (B, 4, h, w), on the VAE's device as sent. A large one (or one over the tile size)
    is decoded a piece at a time (sdxl_core.decoding), so that other calls take turns between its pieces."""

    latents: torch.Tensor
    tile: int | None = None  # --vae-tile
    whole_pixels: int = WHOLE_DECODE_PIXELS  # --vae-whole-pixels
    decoding: Decoding | None = None  # once its first piece ran

    @property
    def piecewise(self) -> bool:
        h, w = self.latents.shape[-2:]
        pixels = h * w * VAE_SCALE_FACTOR**2
        return pixels > self.whole_pixels or (self.tile is not None and max(h, w) * VAE_SCALE_FACTOR > self.tile)

    @property
    def key(self) -> tuple:
        """Calls of one key may share a decode: (h, w, dtype)."""
        return (*self.latents.shape[-2:], self.latents.dtype)

    @property
    def rows(self) -> int:
        return self.latents.shape[0]


@dataclass
class EncodeWork:
    """An Encode call, checked: `start` makes its encode (on its own seeded generator) a piece at a time
    (sdxl_core.stages' *_pieces), so that other calls take turns between its pieces."""

    start: Callable[[], Pieces]
    pieces: Pieces | None = None  # once its first piece ran


class VaeEngine(Engine):
    """Each iteration: the lead Decode call with the others of its key that fit the row budget in one decode
    (pixels (B, 3, 8h, 8w) in [-1, 1] back to each), or the lead Encode call alone."""

    def __init__(self, vae: torch.nn.Module, policy: str = "batch", budget: RowBudget | None = None):
        self.vae, self.budget = vae, budget or RowBudget(limit=MAX_IMAGES)
        super().__init__("vae", policy)

    @torch.no_grad()
    def iterate(self, jobs: list[Job]) -> None:
        lead = jobs[0]
        if isinstance(lead.work, EncodeWork):
            self.serve(lead)
            work = lead.work
            if work.pieces is None:
                work.pieces = work.start()
            try:
                next(work.pieces)
            except StopIteration as done:
                lead.finish(done.value)
            return
        if lead.work.piecewise:
            self.serve(lead)
            work = lead.work
            if work.decoding is None:
                work.decoding = Decoding(self.vae, work.latents, work.tile)
            work.decoding.advance()
            if work.decoding.done:
                lead.finish(work.decoding.images())
            return
        key = lead.work.key
        peers = [job for job in jobs if isinstance(job.work, DecodeWork) and not job.work.piecewise
                 and job.work.key == key]
        budget = lead.work.rows
        if len(peers) > 1:
            budget = max(budget, self.budget.rows(key, lambda: self._calibrate(lead.work.latents)))
        batch, rows = [], 0
        for job in peers:
            if not batch or rows + job.work.rows <= budget:
                batch.append(job)
                rows += job.work.rows
        for job in batch:
            self.serve(job)
        images = latents_to_images(self.vae, torch.cat([job.work.latents for job in batch]))
        metrics.observe_forward(self.stage, rows)
        for job, pixels in zip(batch, images.split([job.work.rows for job in batch])):
            job.finish(pixels)

    def _calibrate(self, latents: torch.Tensor) -> tuple[int, dict[int, float]]:
        """The per-image cost curve of this VAE's decode at the size of `latents`."""
        def decode(rows: int) -> float:
            batch = repeated(latents, rows)
            return timed(lambda: latents_to_images(self.vae, batch), latents.device)

        rows, curve = calibrate(decode, len(latents), self.budget.limit)
        self.log.info("row budget of the vae at latents %sx%s %s: %d images; seconds per image %s",
                      *latents.shape[-2:], latents.dtype, rows, {r: round(c, 5) for r, c in curve.items()})
        return rows, curve


def result(engine: Engine, job: Job):
    """The job's result: Decode and Encode report no progress, so it is the one event."""
    return next(engine.events(job))[1]


def finish_images(images: torch.Tensor, watermark: bool) -> list:
    """decode_stage after its VAE decode: images (B, 3, H, W) in [-1, 1] -> PIL images, watermarked if asked."""
    if watermark:
        images = apply_watermark(images)
    return postprocess(images, "pil")


class VaeServicer(vae_pb2_grpc.VaeServicer):
    """Decode and Encode over one VAE, which the engine's worker alone runs; no per-request state."""

    def __init__(self, vae: torch.nn.Module, policy: str = "batch", max_batch_rows: int | None = None,
                 tile: int | None = None, whole_pixels: int | None = None, max_pixels: int = MAX_PIXELS):
        if tile is not None and (tile < 64 or tile % (4 * VAE_SCALE_FACTOR)):
            raise ValueError(f"the VAE tile must be a multiple of {4 * VAE_SCALE_FACTOR} pixels, at least 64; got {tile}")
        self.vae, self.tile, self.max_pixels = vae, tile, max_pixels
        self.whole_pixels = WHOLE_DECODE_PIXELS if whole_pixels is None else whole_pixels
        self.engine = VaeEngine(vae, policy, RowBudget(max_batch_rows, limit=MAX_IMAGES))

    def describe(self) -> stage_pb2.StageDescription:
        return stage_pb2.StageDescription(
            model_kind="vae", dtype=wire_dtype(self.vae.dtype), device=str(self.device),
            limits=stage_pb2.StageLimits(max_images=MAX_IMAGES))

    def Decode(self, request_iterator, context):
        """Latents in; PNG images or the uint8 tensor "images" out, watermarked unless turned off. The engine's
        worker decodes; this thread watermarks and encodes the images."""
        header, tensors = read_header_stream(request_iterator, "DecodeRequest", names={"latents"})
        latents = expect(tensors, "latents", ("B", 4, None, None), FLOATS)
        metrics.observe_batch("vae", "Decode", latents.shape[0])
        h, w = latents.shape[-2:]
        if not (1 <= latents.shape[0] <= MAX_IMAGES and h >= 1 and w >= 1
                and h * w * VAE_SCALE_FACTOR**2 <= self.max_pixels):
            raise ValueError(f"tensor 'latents' of shape {tuple(latents.shape)} must hold 1 to {MAX_IMAGES} "
                             f"images of 1 to {self.max_pixels} pixels each (--max-pixels)")
        watermark = header.watermark if header.HasField("watermark") else True
        if watermark and not watermark_available():
            raise FailedPrecondition("this VAE stage cannot watermark (invisible-watermark is not installed); "
                                     "send watermark=false")
        job = self.engine.submit(Job(DecodeWork(latents.to(self.device), self.tile, self.whole_pixels), priority(header.priority),
                                     calls.deadline(context), calls.watch(context)))
        images = finish_images(result(self.engine, job), watermark)
        if header.output_format == vae_pb2.OUTPUT_FORMAT_RAW:
            pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]))  # (B, H, W, 3) uint8
            for chunk in to_proto_chunks("images", pixels):
                yield vae_pb2.DecodeResponse(chunk=chunk)
            return
        for index, image in enumerate(images):
            for piece in image_chunks(to_png(image), index):
                yield vae_pb2.DecodeResponse(image=piece)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def Encode(self, request_iterator, context):
        """Images (and masks) in; image_latents (mask, masked_image_latents) out, the draws on the first message."""
        inputs = read_encode(request_iterator)
        job = self.engine.submit(Job(EncodeWork(self.prepare_encode(inputs)), priority(inputs.header.priority),
                                     calls.deadline(context), calls.watch(context)))
        encoded = result(self.engine, job)
        draws = vae_pb2.EncodeDraws(image_samples=encoded.draws.image_samples,
                                    masked_image_samples=encoded.draws.masked_image_samples,
                                    dtype=wire_dtype(encoded.draws.dtype))
        tensors = {name: getattr(encoded, name) for name in ("image_latents", "mask", "masked_image_latents")}
        for chunks in packed_chunks({name: t for name, t in tensors.items() if t is not None}):
            yield vae_pb2.EncodeResponse(chunks=chunks, draws=draws)
            draws = None  # on the first message only

    def prepare_encode(self, inputs: EncodeInputs) -> Callable[[], Pieces]:
        """Check the inputs; encode_image_pieces (no mask) or encode_inpaint_pieces on a generator seeded S, to run."""
        header = inputs.header
        image = image_inputs(inputs, "image", "RGB")
        mask = image_inputs(inputs, "mask_image", "L")
        if image is None:
            raise ValueError("`image` is required: one PNG / JPEG per image, or the tensor 'image'")
        check_encode_header(header, mask is not None)
        check_encoded_size(image, header, self.max_pixels)
        dtype = wire_float_dtype("dtype", header.dtype)
        seed = header.seed if header.HasField("seed") else secrets.randbits(63)
        generator = torch.Generator("cpu").manual_seed(seed)
        height, width = header.height or None, header.width or None
        pixels = preprocess_image(image, height, width).float()  # (N, 3, H, W) in [-1, 1]
        if mask is None:
            return partial(encode_image_pieces, self.vae, pixels, len(pixels), generator, self.device, dtype)
        check_mask_matches(image, mask)
        masks = preprocess_mask(mask, *pixels.shape[-2:])  # (M, 1, H, W)
        n, m, batch = pixels.shape[0], masks.shape[0], header.batch_size
        if n != m and 1 not in (n, m):
            raise ValueError(f"got {n} images and {m} masks; send as many masks as images, or one of either")
        if batch % max(n, m):
            raise ValueError(f"`batch_size` {batch} must be a multiple of the {max(n, m)} images / masks")
        return partial(
            encode_inpaint_pieces, self.vae, pixels, masks, batch, generator, self.device, dtype,
            encode_image=not header.skip_image_latents, masked_image_latents=header.masked_image_latents,
            noise_dtype=dtype)

    def close(self) -> None:
        self.engine.stop()


def load_vae_model(model: str | Path, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """The VAE of a diffusers folder or an original single file, or a VAE alone (folder or file); nothing else
    is read (sdxl_core.loading.load_vae)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return load_vae(model, DTYPES[dtype], device=device)


def load_servicer(model: str | Path, device: str = "cpu", dtype: str = "float32", **engine) -> VaeServicer:
    """`engine`: policy, max_batch_rows, tile and whole_pixels, as VaeServicer takes them."""
    return VaeServicer(load_vae_model(model, device, dtype), **engine)


def make_server(servicer: VaeServicer, address: str = "[::]:0", options: ServerOptions = OPTIONS) -> Server:
    """A started, SERVING Vae server over a servicer whose model is loaded."""
    server = Server("vae", [(add_servicer, servicer)], [SERVICE], address, options, on_stop=servicer.close)
    server.start()
    server.set_serving(servicer.describe())
    return server


def build(model: str | Path, device: str = "cpu", dtype: str = "float32", address: str = "[::]:0",
          options: ServerOptions = OPTIONS, **engine) -> Server:
    """Load the VAE, then a started, SERVING Vae server; `engine`: policy and max_batch_rows."""
    return make_server(load_servicer(model, device, dtype, **engine), address, options)
