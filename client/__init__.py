"""The sdxl.v1 client library and the sdxl command: grpcio, protobuf and Pillow only, no torch."""

from sdxl_wire.images import ChunkError

from .client import AsyncSDXLClient, GenerateResult, ProtocolError, SDXLClient

__all__ = ["AsyncSDXLClient", "ChunkError", "GenerateResult", "ProtocolError", "SDXLClient"]
