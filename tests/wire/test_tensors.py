import itertools
import math

import pytest
import torch

from sdxl.v1 import denoiser_pb2, tensor_pb2, vae_pb2
from sdxl_wire import CHUNK_BYTES
from sdxl_wire.tensors import (
    FLOATS,
    TensorAssembler,
    expect,
    packed,
    packed_chunks,
    read_header_stream,
    to_proto,
    to_proto_chunks,
)
from tests.wire.streams import assemble, decoded

GRPC_DEFAULT_LIMIT = 4 * 1024 * 1024

WIRE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]


def sample(dtype: torch.dtype, shape=(3, 5, 7)) -> torch.Tensor:
    """Values that exercise every byte: random, signed, and for floats inf, -inf, nan and -0."""
    if dtype.is_floating_point:
        x = torch.randn(shape, dtype=torch.float32).to(dtype) * 100
        x.view(-1)[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0]).to(dtype)
        return x
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and -0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    int_of = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(int_of), b.contiguous().view(int_of))


def chunks_of(tensors: dict, chunk_bytes: int = CHUNK_BYTES) -> list:
    return [c for name, t in tensors.items() for c in to_proto_chunks(name, t, chunk_bytes)]


@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact_through_odd_sized_chunks(dtype):
    x = sample(dtype)
    chunks = list(to_proto_chunks("x", x, chunk_bytes=7))  # 7 splits elements across chunks
    assert len(chunks) == math.ceil(x.numel() * x.element_size() / 7)
    y = assemble(chunks)["x"]
    assert same_bits(x, y)


@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=str)
def test_every_dtype_round_trips_as_one_message(dtype):
    x = sample(dtype)
    assert same_bits(x, decoded(to_proto(x)))


def test_bytes_on_the_wire_are_little_endian_and_bfloat16_is_the_top_half_of_float32():
    wire = {
        torch.float32: b"\x00\x00\x80\x3f",
        torch.bfloat16: b"\x80\x3f",
        torch.float16: b"\x00\x3c",
        torch.int64: b"\x01" + b"\x00" * 7,
        torch.int32: b"\x01\x00\x00\x00",
    }
    for dtype, expected in wire.items():
        assert to_proto(torch.ones((), dtype=dtype)).data == expected, dtype
        assert next(to_proto_chunks("one", torch.ones(1, dtype=dtype))).data == expected, dtype
    chunk = next(to_proto_chunks("x", torch.tensor([1, -2], dtype=torch.int32)))
    assert (chunk.dtype, list(chunk.shape), chunk.data) == (tensor_pb2.DTYPE_INT32, [2], b"\x01\0\0\0\xfe\xff\xff\xff")


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.transpose(0, 2),
        lambda x: x[:, ::2, 1:],
        lambda x: x[0].unsqueeze(0).expand(4, 5, 7),  # stride 0
        lambda x: x.permute(2, 0, 1)[1:],
    ],
    ids=["transposed", "strided-slice", "expanded", "permuted-slice"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
def test_non_contiguous_tensors_arrive_in_logical_order(make, dtype):
    x = make(sample(dtype))
    assert not x.is_contiguous()
    y = assemble(to_proto_chunks("x", x, chunk_bytes=13))["x"]
    assert same_bits(x.contiguous(), y)
    assert same_bits(x.contiguous(), decoded(to_proto(x)))


def test_a_tensor_that_requires_grad_is_sent_by_value():
    x = torch.randn(2, 3, requires_grad=True) * 2
    assert torch.equal(assemble(to_proto_chunks("x", x))["x"], x.detach())


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3)], ids=["scalar", "empty", "empty-3d"])
def test_scalars_and_empty_tensors_round_trip_in_one_chunk(shape):
    x = torch.full(shape, 3.5)
    chunks = list(to_proto_chunks("x", x, chunk_bytes=2))
    assert len(chunks) == (2 if shape == () else 1)
    y = assemble(chunks)["x"]
    assert y.shape == x.shape and torch.equal(x, y)


def test_a_batch_of_1024_images_and_latents_interleaved_arrive_intact_in_messages_under_4_mib():
    images = torch.randint(0, 256, (2, 3, 1024, 1024), dtype=torch.uint8)
    latents = torch.randn(2, 4, 128, 128)
    streams = [to_proto_chunks("images", images), to_proto_chunks("latents", latents)]
    interleaved = [c for pair in itertools.zip_longest(*streams) for c in pair if c is not None]
    assert len(interleaved) == 6 + 1  # 6 MiB of images, 0.5 MiB of latents
    for chunk in interleaved:
        assert vae_pb2.DecodeResponse(chunk=chunk).ByteSize() < GRPC_DEFAULT_LIMIT
    got = assemble(interleaved)
    assert set(got) == {"images", "latents"}
    assert torch.equal(got["images"], images)
    assert torch.equal(got["latents"], latents)


def test_packed_groups_small_tensors_into_few_messages_under_the_chunk_size_in_order():
    tensors = {f"t{i}": sample(torch.float32, (77, 2048 // (i + 1))) for i in range(8)}  # 630 KB down to 79 KB
    groups = list(packed_chunks(tensors))
    flat = [c for g in groups for c in g]
    assert [(c.name, c.offset) for c in flat] == [(c.name, c.offset) for n, t in tensors.items()
                                                    for c in to_proto_chunks(n, t)]
    assert all(sum(len(c.data) for c in g) <= CHUNK_BYTES for g in groups)
    # greedy: no group could have taken the next group's first chunk
    assert all(sum(len(c.data) for c in g) + len(after[0].data) > CHUNK_BYTES
               for g, after in zip(groups, groups[1:]))
    assert len(groups) < len(tensors)
    got = assemble(flat)
    assert all(got[n].view(torch.int32).equal(t.view(torch.int32)) for n, t in tensors.items())  # bits: NaN too


def test_packed_gives_one_empty_group_for_no_chunks_so_a_header_still_travels():
    assert list(packed([])) == [[]]


def test_a_header_stream_takes_chunks_on_the_header_message_and_later_ones():
    a, b = sample(torch.float16, (2, 3)), sample(torch.int64, (5,))
    chunks = [*to_proto_chunks("a", a, chunk_bytes=4), *to_proto_chunks("b", b, chunk_bytes=16)]
    header = denoiser_pb2.DenoiseHeader(num_inference_steps=3)
    messages = [denoiser_pb2.DenoiseRequest(header=header, chunks=chunks[:2]),
                denoiser_pb2.DenoiseRequest(chunks=chunks[2:5]), denoiser_pb2.DenoiseRequest(chunks=chunks[5:])]
    got_header, got = read_header_stream(iter(messages), "DenoiseRequest", names={"a", "b"})
    assert got_header == header
    assert got["a"].view(torch.int16).equal(a.view(torch.int16)) and got["b"].equal(b)


@pytest.mark.parametrize("messages, error", [
    ([], "the first DenoiseRequest must carry the header"),
    ([denoiser_pb2.DenoiseRequest(chunks=[tensor_pb2.TensorChunk(name="a")])], "must carry the header"),
    ([denoiser_pb2.DenoiseRequest(header=denoiser_pb2.DenoiseHeader()),
      denoiser_pb2.DenoiseRequest(header=denoiser_pb2.DenoiseHeader())], "only the first DenoiseRequest"),
])
def test_a_header_stream_needs_the_header_first_and_only_there(messages, error):
    with pytest.raises(ValueError, match=error):
        read_header_stream(iter(messages), "DenoiseRequest")


def test_only_the_first_chunk_carries_dtype_and_shape():
    chunks = list(to_proto_chunks("x", torch.zeros(10, dtype=torch.int64), chunk_bytes=16))
    assert [c.offset for c in chunks] == [0, 16, 32, 48, 64]
    assert (chunks[0].dtype, list(chunks[0].shape)) == (tensor_pb2.DTYPE_INT64, [10])
    assert all(c.dtype == tensor_pb2.DTYPE_UNSPECIFIED and not c.shape for c in chunks[1:])


def test_a_dtype_without_a_wire_form_is_refused_at_the_call_naming_the_tensor():
    for dtype in (torch.bool, torch.complex64, torch.int16):
        with pytest.raises(ValueError, match="'mask'"):
            to_proto_chunks("mask", torch.zeros(2, dtype=dtype))
        with pytest.raises(ValueError, match="'mask'"):
            to_proto(torch.zeros(2, dtype=dtype), name="mask")
    with pytest.raises(ValueError, match="name"):
        to_proto_chunks("", torch.zeros(2))


# --- corrupt or hostile streams: every error is a ValueError naming the tensor


def latents_chunks(chunk_bytes=64):
    return list(to_proto_chunks("latents", torch.randn(2, 4, 8, 8), chunk_bytes))  # 2048 bytes, 32 chunks


def test_a_truncated_tensor_is_an_error_at_the_end_of_the_stream():
    assembler = TensorAssembler()
    for chunk in latents_chunks()[:-1]:
        assembler.add(chunk)
    with pytest.raises(ValueError, match=r"'latents'.*truncated.*1984 of 2048"):
        assembler.finish()


def test_a_shape_too_small_for_the_bytes_sent_is_an_error():
    chunks = latents_chunks()
    del chunks[0].shape[:]
    chunks[0].shape.extend([2, 4, 8, 4])  # half the elements the data holds
    with pytest.raises(ValueError, match=r"'latents' of shape \(2, 4, 8, 4\) holds 1024 bytes.*offset 1024"):
        assemble(chunks)
    chunk = next(to_proto_chunks("pooled", torch.zeros(16)))
    chunk.shape[0] = 3
    with pytest.raises(ValueError, match=r"'pooled' of shape \(3,\) holds 12 bytes, but its chunks bring 64"):
        assemble([chunk])


def test_a_shape_too_large_for_the_bytes_sent_is_truncated():
    chunks = latents_chunks()
    chunks[0].shape[-1] = 9
    with pytest.raises(ValueError, match="'latents'.*truncated"):
        assemble(chunks)


@pytest.mark.parametrize("dtype", [tensor_pb2.DTYPE_UNSPECIFIED, 99])
def test_an_unknown_dtype_is_an_error(dtype):
    chunks = latents_chunks()
    chunks[0].dtype = dtype
    with pytest.raises(ValueError, match=rf"'latents' has unknown dtype {dtype}"):
        assemble(chunks)


def test_a_negative_size_is_an_error():
    chunk = tensor_pb2.TensorChunk(name="mask", dtype=tensor_pb2.DTYPE_UINT8, shape=[-1, 4])
    with pytest.raises(ValueError, match="'mask' has a negative size"):
        assemble([chunk])


def test_an_oversized_tensor_is_refused_on_its_first_chunk_before_taking_memory():
    huge = tensor_pb2.TensorChunk(name="latents", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20])
    with pytest.raises(ValueError, match=r"'latents' of shape \(1048576, 1048576\) is 4398046511104 bytes"):
        TensorAssembler().add(huge)  # 4 TiB: would fail with MemoryError if it were allocated
    with pytest.raises(ValueError, match="'latents'.*2048 bytes, over the limit of 2047"):
        assemble(latents_chunks(), max_bytes=2047)
    assert assemble(latents_chunks(), max_bytes=2048)["latents"].shape == (2, 4, 8, 8)


def test_the_total_limit_counts_every_tensor_of_the_call():
    chunks = chunks_of({"a": torch.zeros(100, dtype=torch.uint8), "b": torch.zeros(100, dtype=torch.uint8)})
    assert set(assemble(chunks, max_total_bytes=200)) == {"a", "b"}
    with pytest.raises(ValueError, match="'b' of 100 bytes.*limit of 199"):
        assemble(chunks, max_total_bytes=199)


def test_chunks_out_of_order_are_an_error():
    chunks = latents_chunks()
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(ValueError, match="'latents': chunk at offset 128, expected 64"):
        assemble(chunks)


def test_a_lost_chunk_in_the_middle_is_an_error():
    chunks = latents_chunks()
    del chunks[5]
    with pytest.raises(ValueError, match="'latents': chunk at offset 384, expected 320"):
        assemble(chunks)


def test_a_tensor_not_starting_at_offset_zero_is_an_error():
    with pytest.raises(ValueError, match="'latents' starts at offset 64"):
        assemble(latents_chunks()[1:])


def test_a_name_sent_twice_is_an_error():
    with pytest.raises(ValueError, match="'latents' was sent twice"):
        assemble(latents_chunks() * 2)
    first = latents_chunks()
    with pytest.raises(ValueError, match="'latents': chunk at offset 0, expected 128"):
        assemble(first[:2] + first)  # restarted before it was complete


def test_a_later_chunk_that_changes_dtype_or_shape_is_an_error():
    chunks = latents_chunks()
    chunks[3].dtype = tensor_pb2.DTYPE_FLOAT16
    with pytest.raises(ValueError, match="'latents'.*changes dtype or shape"):
        assemble(chunks)
    chunks = latents_chunks()
    chunks[3].shape.extend([2, 4, 16, 4])
    with pytest.raises(ValueError, match="'latents'.*changes dtype or shape"):
        assemble(chunks)
    chunks = latents_chunks()
    chunks[3].shape.extend([2, 4, 8, 8])  # repeating them unchanged is allowed
    assert assemble(chunks)["latents"].shape == (2, 4, 8, 8)


def test_names_outside_the_calls_list_and_nameless_chunks_are_errors():
    with pytest.raises(ValueError, match="unexpected tensor 'latents'; this call takes image_latents, mask"):
        assemble(latents_chunks(), names={"mask", "image_latents"})
    with pytest.raises(ValueError, match="no name"):
        assemble([tensor_pb2.TensorChunk(dtype=tensor_pb2.DTYPE_UINT8, shape=[1], data=b"\0")])


# --- expect: the shape and dtype a servicer needs


def embeddings(batch=2, pooled_batch=2):
    return {"prompt_embeds": torch.zeros(batch, 77, 2048), "pooled_prompt_embeds": torch.zeros(pooled_batch, 1280)}


def test_expect_returns_the_tensor_when_shape_and_dtype_fit_and_binds_named_dims():
    tensors, dims = embeddings(), {}
    assert expect(tensors, "prompt_embeds", ("B", 77, 2048), FLOATS, dims) is tensors["prompt_embeds"]
    assert expect(tensors, "pooled_prompt_embeds", ("B", None), torch.float32, dims) is tensors["pooled_prompt_embeds"]
    assert dims == {"B": 2}


def test_expect_names_the_tensor_and_the_expected_shape_on_a_wrong_rank_or_size():
    tensors = embeddings()
    with pytest.raises(ValueError, match=r"'prompt_embeds' has shape \(2, 77, 2048\), expected \(B, 77, 1280\)"):
        expect(tensors, "prompt_embeds", ("B", 77, 1280))
    with pytest.raises(ValueError, match=r"'pooled_prompt_embeds' has shape \(2, 1280\), expected \(B, 77, \*\)"):
        expect(tensors, "pooled_prompt_embeds", ("B", 77, None))


def test_expect_checks_a_named_dim_across_tensors():
    tensors, dims = embeddings(batch=2, pooled_batch=3), {}
    expect(tensors, "prompt_embeds", ("B", 77, 2048), dims=dims)
    with pytest.raises(ValueError, match=r"'pooled_prompt_embeds' has shape \(3, 1280\).*with B = 2"):
        expect(tensors, "pooled_prompt_embeds", ("B", 1280), dims=dims)
    with pytest.raises(ValueError, match="with N = 4"):
        expect({"mask": torch.zeros(4, 1, 8, 9)}, "mask", ("N", 1, "N", "N"))
    assert dims == {"B": 2}


def test_expect_checks_dtype_and_presence():
    tensors = {"mask": torch.zeros(1, 1, 8, 8, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="'mask' is torch.uint8, expected torch.float32 or torch.float16"):
        expect(tensors, "mask", (1, 1, 8, 8), (torch.float32, torch.float16))
    with pytest.raises(ValueError, match=r"missing tensor 'latents', expected \(B, 4, \*, \*\)"):
        expect(tensors, "latents", ("B", 4, None, None))
    assert expect(tensors, "latents", ("B", 4, None, None), required=False) is None
