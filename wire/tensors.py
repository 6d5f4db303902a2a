"""The tensor codec: the only code that turns sdxl.v1 tensor messages into torch tensors and back.

    for chunk in to_proto_chunks("latents", latents):  # (B, 4, h, w) -> 1 MiB pieces
        yield DenoiseResponse(chunk=chunk)
    for chunks in packed_chunks(embeds):  # {name: tensor}; small tensors share a message
        yield EncodePromptResponse(chunks=chunks)

    header, tensors = read_header_stream(requests, "DenoiseRequest", names={"latents"})
    latents = expect(tensors, "latents", ("B", 4, None, None), FLOATS)

Bytes on the wire are little-endian whatever the host; bfloat16 travels as its 16 bits.
Every error is a ValueError naming the tensor (the servers' interceptor makes it INVALID_ARGUMENT).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sdxl.v1 import tensor_pb2
from sdxl_wire import CHUNK_BYTES, FLOAT_DTYPES

DEFAULT_MAX_BYTES = 1 << 30  # per tensor: 8 images of 2048 x 2048 x 3 float32 fit

DTYPES = {name: getattr(torch, name) for name in FLOAT_DTYPES}  # a flag's dtype name -> torch dtype
FLOATS = tuple(DTYPES.values())

# wire dtype -> (torch dtype, the little-endian numpy dtype its bytes are read as; bfloat16 as its int16 bits)
_DTYPES = {
    tensor_pb2.DTYPE_FLOAT32: (torch.float32, np.dtype("<f4")),
    tensor_pb2.DTYPE_FLOAT16: (torch.float16, np.dtype("<f2")),
    tensor_pb2.DTYPE_BFLOAT16: (torch.bfloat16, np.dtype("<i2")),
    tensor_pb2.DTYPE_FLOAT64: (torch.float64, np.dtype("<f8")),
    tensor_pb2.DTYPE_INT64: (torch.int64, np.dtype("<i8")),
    tensor_pb2.DTYPE_INT32: (torch.int32, np.dtype("<i4")),
    tensor_pb2.DTYPE_UINT8: (torch.uint8, np.dtype("u1")),
}
_WIRE = {torch_dtype: wire for wire, (torch_dtype, _) in _DTYPES.items()}


def wire_dtype(dtype: torch.dtype) -> int:
    """The DType enum value of a torch dtype."""
    return _wire_dtype("dtype", dtype)


def wire_float_dtype(name: str, value: int) -> torch.dtype:
    """A header's DType field as a float torch dtype; unset means float32."""
    if value == tensor_pb2.DTYPE_UNSPECIFIED:
        return torch.float32
    if value not in _DTYPES or _DTYPES[value][0] not in FLOATS:
        raise ValueError(f"`{name}` must be FLOAT32, FLOAT16 or BFLOAT16, got {value}")
    return _DTYPES[value][0]


def _wire_dtype(name: str, dtype: torch.dtype) -> int:
    if dtype not in _WIRE:
        raise ValueError(f"tensor {name!r} is {dtype}, which has no wire dtype; use one of "
                         f"{', '.join(str(d) for d in _WIRE)}")
    return _WIRE[dtype]


def _le_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's elements in C order as a flat uint8 array of little-endian bytes (a view where possible)."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; the bits travel unchanged
    array = t.numpy()
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)  # a no-op on little-endian hosts
    return array.reshape(-1).view(np.uint8)


def _decode(dtype: int, shape: tuple[int, ...], data: bytearray) -> torch.Tensor:
    """Little-endian bytes -> a tensor sharing `data`."""
    torch_dtype, wire_dtype = _DTYPES[dtype]
    array = np.frombuffer(data, dtype=wire_dtype).reshape(shape)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else tensor


def _nbytes(name: str, dtype: int, shape: Sequence[int]) -> int:
    """Bytes a tensor of this wire dtype and shape holds, after checking both."""
    if dtype not in _DTYPES:
        known = ", ".join(tensor_pb2.DType.Name(d) for d in _DTYPES)
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype}; expected one of {known}")
    if any(size < 0 for size in shape):
        raise ValueError(f"tensor {name!r} has a negative size in shape {tuple(shape)}")
    return math.prod(shape) * _DTYPES[dtype][1].itemsize


def _check_limit(name: str, shape: Sequence[int], nbytes: int, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise ValueError(f"tensor {name!r} of shape {tuple(shape)} is {nbytes} bytes, over the limit of {max_bytes}")


def to_proto(tensor: torch.Tensor, name: str = "tensor") -> tensor_pb2.Tensor:
    """A small tensor as one Tensor message (progress previews); large ones go by to_proto_chunks."""
    dtype = _wire_dtype(name, tensor.dtype)
    return tensor_pb2.Tensor(dtype=dtype, shape=tensor.shape, data=_le_bytes(tensor).tobytes())


def to_proto_chunks(
    name: str, tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tensor_pb2.TensorChunk]:
    """TensorChunks of at most `chunk_bytes` data each; the first carries dtype and shape. At least one chunk."""
    if not name:
        raise ValueError("a tensor on the wire needs a name")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    dtype = _wire_dtype(name, tensor.dtype)
    data = _le_bytes(tensor)  # checked and converted now, not when the stream is first read
    return _chunks(name, dtype, tuple(tensor.shape), data, chunk_bytes)


def packed(
    chunks: Iterable[tensor_pb2.TensorChunk], max_bytes: int = CHUNK_BYTES
) -> Iterator[list[tensor_pb2.TensorChunk]]:
    """Chunks in order, grouped into messages of at most `max_bytes` data each (a chunk alone may reach it);
    a group per message of a `repeated TensorChunk chunks` field. At least one group, possibly empty, so a
    header always has a message to travel on."""
    group: list[tensor_pb2.TensorChunk] = []
    size = 0
    for chunk in chunks:
        if group and size + len(chunk.data) > max_bytes:
            yield group
            group, size = [], 0
        group.append(chunk)
        size += len(chunk.data)
    yield group


def packed_chunks(tensors: Mapping[str, torch.Tensor]) -> Iterator[list[tensor_pb2.TensorChunk]]:
    """{name: tensor} as to_proto_chunks, packed into message-sized groups."""
    return packed(itertools.chain.from_iterable(to_proto_chunks(name, t) for name, t in tensors.items()))


def read_header_stream(requests: Iterator, message: str, **limits) -> tuple[object, dict[str, torch.Tensor]]:
    """(header, {name: tensor}) from a stream of `message`s with `header` on the first message only and
    `repeated TensorChunk chunks` on any; `limits` as TensorAssembler's."""
    first = next(requests, None)
    if first is None or not first.HasField("header"):
        raise ValueError(f"the first {message} must carry the header")
    assembler = TensorAssembler(**limits)
    for request in itertools.chain([first], requests):
        if request is not first and request.HasField("header"):
            raise ValueError(f"only the first {message} may carry the header")
        for chunk in request.chunks:
            assembler.add(chunk)
    return first.header, assembler.finish()


def _chunks(name: str, dtype: int, shape: tuple[int, ...], data: np.ndarray, chunk_bytes: int):
    yield tensor_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, offset=0, data=data[:chunk_bytes].tobytes())
    for offset in range(chunk_bytes, data.size, chunk_bytes):
        yield tensor_pb2.TensorChunk(name=name, offset=offset, data=data[offset : offset + chunk_bytes].tobytes())


@dataclass
class _Partial:
    dtype: int
    shape: tuple[int, ...]
    data: bytearray
    filled: int = 0


class TensorAssembler:
    """Whole tensors from a stream's TensorChunks, which may interleave names; each chunk is checked as it comes.

    max_bytes caps each tensor and max_total_bytes all of them, both checked on a tensor's first chunk,
    before its memory is taken; `names`, if given, are the only names accepted.
    """

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_total_bytes: int | None = None,
        names: Collection[str] | None = None,
    ):
        self.max_bytes, self.max_total_bytes, self.names = max_bytes, max_total_bytes, names
        self._partial: dict[str, _Partial] = {}
        self._done: dict[str, torch.Tensor] = {}
        self._total = 0

    def add(self, chunk: tensor_pb2.TensorChunk) -> None:
        """Take one chunk: the first of a tensor (offset 0, with dtype and shape) or the next of one."""
        name = chunk.name
        if not name:
            raise ValueError("a tensor chunk has no name")
        if name in self._done:
            self._after_the_end(name, chunk.offset)
        partial = self._partial.get(name) or self._start(chunk)
        if chunk.offset != partial.filled:
            raise ValueError(f"tensor {name!r}: chunk at offset {chunk.offset}, expected {partial.filled} "
                             f"(chunks come in order, each tensor once)")
        if (chunk.dtype and chunk.dtype != partial.dtype) or (chunk.shape and tuple(chunk.shape) != partial.shape):
            raise ValueError(f"tensor {name!r}: a chunk at offset {chunk.offset} changes dtype or shape to "
                             f"{chunk.dtype}, {tuple(chunk.shape)}")
        end = partial.filled + len(chunk.data)
        if end > len(partial.data):
            raise ValueError(f"tensor {name!r} of shape {partial.shape} holds {len(partial.data)} bytes, "
                             f"but its chunks bring {end} or more")
        partial.data[partial.filled : end] = chunk.data
        partial.filled = end
        if end == len(partial.data):
            self._done[name] = _decode(partial.dtype, partial.shape, partial.data)
            del self._partial[name]

    def _after_the_end(self, name: str, offset: int) -> None:
        if offset == 0:
            raise ValueError(f"tensor {name!r} was sent twice")
        done = self._done[name]
        raise ValueError(f"tensor {name!r} of shape {tuple(done.shape)} holds {done.numel() * done.element_size()} "
                         f"bytes, but a chunk at offset {offset} came after them")

    def _start(self, chunk: tensor_pb2.TensorChunk) -> _Partial:
        name, shape = chunk.name, tuple(chunk.shape)
        if self.names is not None and name not in self.names:
            raise ValueError(f"unexpected tensor {name!r}; this call takes {', '.join(sorted(self.names))}")
        if chunk.offset != 0:
            raise ValueError(f"tensor {name!r} starts at offset {chunk.offset}, expected 0")
        nbytes = _nbytes(name, chunk.dtype, shape)
        _check_limit(name, shape, nbytes, self.max_bytes)
        if self.max_total_bytes is not None and self._total + nbytes > self.max_total_bytes:
            raise ValueError(f"tensor {name!r} of {nbytes} bytes takes this call's tensors over the limit "
                             f"of {self.max_total_bytes} bytes")
        self._total += nbytes
        self._partial[name] = _Partial(chunk.dtype, shape, bytearray(nbytes))
        return self._partial[name]

    def finish(self) -> dict[str, torch.Tensor]:
        """The tensors, once the stream has ended; a tensor still missing bytes is an error."""
        for name, partial in self._partial.items():
            raise ValueError(f"tensor {name!r} of shape {partial.shape} is truncated: "
                             f"got {partial.filled} of {len(partial.data)} bytes")
        return dict(self._done)


Pattern = Sequence[int | str | None]


def _show(pattern: Pattern) -> str:
    return "(" + ", ".join("*" if size is None else str(size) for size in pattern) + ")"


def expect(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    shape: Pattern,
    dtype: torch.dtype | Collection[torch.dtype] | None = None,
    dims: dict[str, int] | None = None,
    required: bool = True,
) -> torch.Tensor | None:
    """tensors[name], checked: an int in `shape` must match, None matches any size, and a letter ("B") the
    same size wherever it recurs, across the calls that share `dims`; a float tensor must be finite.
    Absent and not required: None.

        dims = {}
        embeds = expect(tensors, "prompt_embeds", ("B", 77, 2048), FLOATS, dims)
        pooled = expect(tensors, "pooled_prompt_embeds", ("B", 1280), FLOATS, dims)  # the same B
    """
    if name not in tensors:
        if required:
            raise ValueError(f"missing tensor {name!r}, expected {_show(shape)}")
        return None
    tensor = tensors[name]
    dims = {} if dims is None else dims
    bound = dict(dims)
    if tensor.ndim != len(shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {_show(shape)}")
    for size, want in zip(tensor.shape, shape):
        if isinstance(want, str) and bound.setdefault(want, size) != size:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {_show(shape)} "
                             f"with {want} = {bound[want]}")
        if isinstance(want, int) and size != want:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {_show(shape)}")
    allowed = (dtype,) if isinstance(dtype, torch.dtype) else dtype
    if allowed is not None and tensor.dtype not in allowed:
        raise ValueError(f"tensor {name!r} is {tensor.dtype}, expected {' or '.join(str(d) for d in allowed)}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"tensor {name!r} holds NaN or infinite values; send finite numbers")
    dims.update(bound)
    return tensor
