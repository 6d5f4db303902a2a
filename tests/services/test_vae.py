"""The Vae server: Decode gives the pipelines' pixels with and without the watermark, as PNG or RAW; Encode
refuses corrupt images, decompression bombs and mismatched masks with INVALID_ARGUMENT naming the field."""

import io

import grpc
import numpy as np
import PIL.Image
import pytest
import torch

from sdxl.v1 import tensor_pb2, vae_pb2, vae_pb2_grpc
from sdxl_core.pipelines import SDXLPipeline
from sdxl_core.watermark import watermark_available
from sdxl_services import vae
from sdxl_wire.tensors import to_proto_chunks
from tests.wire.streams import assemble


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    started = vae.build(tiny_model_dir / "base")
    yield started
    started.stop(0)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return SDXLPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)


def _stub(server):
    return vae_pb2_grpc.VaeStub(grpc.insecure_channel(f"localhost:{server.port}"))


def decode(server, latents, **header):
    messages = [vae_pb2.DecodeRequest(header=vae_pb2.DecodeHeader(**header))]
    messages += [vae_pb2.DecodeRequest(chunks=[c]) for c in to_proto_chunks("latents", latents)]
    return list(_stub(server).Decode(iter(messages), timeout=60))


def raw(server, latents, **header) -> np.ndarray:
    responses = decode(server, latents, output_format=vae_pb2.OUTPUT_FORMAT_RAW, **header)
    return assemble(r.chunk for r in responses)["images"].numpy()


def png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _piece(data: bytes, index=0) -> tensor_pb2.ImageChunk:
    return tensor_pb2.ImageChunk(index=index, total_bytes=len(data), offset=0, data=data)


def encode(server, images: list[bytes], masks: list[bytes] = (), **header):
    messages = [vae_pb2.EncodeRequest(header=vae_pb2.EncodeHeader(**header))]
    messages += [vae_pb2.EncodeRequest(image=_piece(d, i)) for i, d in enumerate(images)]
    messages += [vae_pb2.EncodeRequest(mask_image=_piece(d, i)) for i, d in enumerate(masks)]
    return list(_stub(server).Encode(iter(messages), timeout=60))


LATENTS = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))  # 256 x 256: wide enough to mark


@pytest.mark.skipif(not watermark_available(), reason="invisible-watermark is not installed")
def test_decode_with_and_without_the_watermark_gives_the_pipelines_pixels(server, base):
    marked, plain = raw(server, LATENTS), raw(server, LATENTS, watermark=False)
    base.add_watermarker = True
    try:
        expected_marked = np.asarray(base.decode(LATENTS, "pil")[0])
    finally:
        base.add_watermarker = False
    expected_plain = np.asarray(base.decode(LATENTS, "pil")[0])
    assert marked.shape == plain.shape == (1, 256, 256, 3) and marked.dtype == np.uint8
    assert np.array_equal(marked[0], expected_marked)
    assert np.array_equal(plain[0], expected_plain)
    assert not np.array_equal(marked, plain)


def test_png_output_holds_the_raw_pixels(server):
    latents = LATENTS[..., :8, :8].repeat(2, 1, 1, 1)
    responses = decode(server, latents, watermark=False)
    by_index: dict[int, bytearray] = {}
    for r in responses:
        by_index.setdefault(r.image.index, bytearray()).extend(r.image.data)
    images = [np.asarray(PIL.Image.open(io.BytesIO(bytes(by_index[i])))) for i in sorted(by_index)]
    assert np.array_equal(np.stack(images), raw(server, latents, watermark=False))


def test_encode_without_a_mask_returns_the_sampled_latents_and_their_draws(server):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    responses = encode(server, [png(image)], seed=5)
    tensors = assemble(c for r in responses for c in r.chunks)
    assert list(tensors) == ["image_latents"] and tensors["image_latents"].shape == (1, 4, 8, 6)
    assert responses[0].draws == vae_pb2.EncodeDraws(image_samples=1, dtype=tensor_pb2.DTYPE_FLOAT32)
    again = assemble(c for r in encode(server, [png(image)], seed=5) for c in r.chunks)
    assert torch.equal(again["image_latents"], tensors["image_latents"])


def _bomb() -> bytes:
    return png(PIL.Image.new("L", (5000, 5000)))  # 25 M pixels in a few kB


MASK = png(PIL.Image.new("L", (64, 64), 255))
IMAGE = png(PIL.Image.new("RGB", (64, 64), (200, 10, 10)))
BAD = {
    "corrupt_image": (dict(images=[b"\x89PNG\r\n\x1a\nnot really"]), "image[0]"),
    "decompression_bomb": (dict(images=[_bomb()]), "image[0]"),
    "mask_of_another_size": (dict(images=[IMAGE], masks=[png(PIL.Image.new("L", (56, 48)))], batch_size=1),
                             "mask_image"),
    "no_batch_size_with_a_mask": (dict(images=[IMAGE], masks=[MASK]), "batch_size"),
    "height_not_multiple_of_8": (dict(images=[IMAGE], height=60, width=64), "height"),
    "no_image": (dict(images=[]), "image"),
    "one_pixel_image": (dict(images=[png(PIL.Image.new("RGB", (1, 1)))]), "image[0]"),
    "image_past_the_side_limit": (dict(images=[png(PIL.Image.new("RGB", (64, 2112)))]), "2112x64"),
    "size_past_max_pixels": (dict(images=[IMAGE], height=4096, width=2048), "--max-pixels"),
}


@pytest.mark.parametrize("request_,field", BAD.values(), ids=BAD.keys())
def test_bad_encode_requests_are_invalid_argument_naming_the_field_and_the_next_one_runs(server, request_, field):
    with pytest.raises(grpc.RpcError) as error:
        encode(server, **request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    responses = encode(server, [IMAGE], [MASK], batch_size=1, seed=1)
    assert assemble(c for r in responses for c in r.chunks)["mask"].shape == (
        1, 1, 8, 8)


@pytest.mark.parametrize("latents", [torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 8, 8, dtype=torch.int32),
                                     torch.full((1, 4, 8, 8), float("nan")), torch.zeros(1, 4, 0, 8),
                                     torch.zeros(1, 4, 264, 256)],
                         ids=["channels", "dtype", "nan", "empty", "over_max_pixels"])
def test_bad_latents_are_invalid_argument(server, latents):
    with pytest.raises(grpc.RpcError) as error:
        decode(server, latents, watermark=False)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "latents" in error.value.details()


def test_a_corrupt_image_is_refused_without_pils_message(server):
    with pytest.raises(grpc.RpcError) as error:
        encode(server, [IMAGE[:60]])
    assert error.value.details() == "`image[0]` is not a readable PNG or JPEG image"
