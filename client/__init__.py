"""The sdxl.v1 client library and the sdxl command: grpcio, protobuf and Pillow only, no torch."""

from .client import AsyncSDXLClient, GenerateResult, ProtocolError, SDXLClient
from .images import ChunkError

__all__ = ["AsyncSDXLClient", "ChunkError", "GenerateResult", "ProtocolError", "SDXLClient"]
