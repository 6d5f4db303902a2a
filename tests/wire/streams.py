"""Test helpers: whole tensors from a stream's chunks, as a servicer reads them."""

from sdxl.v1 import tensor_pb2
from sdxl_wire.tensors import TensorAssembler


def assemble(chunks, **limits) -> dict:
    """{name: tensor} from an iterable of TensorChunks; `limits` as TensorAssembler's."""
    assembler = TensorAssembler(**limits)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


def decoded(message, name: str = "tensor"):
    """A Tensor message (a progress preview) as a tensor, read as the one chunk of a stream."""
    chunk = tensor_pb2.TensorChunk(name=name, dtype=message.dtype, shape=message.shape, offset=0, data=message.data)
    return assemble([chunk])[name]
