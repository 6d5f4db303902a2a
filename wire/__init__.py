"""The sdxl.v1 wire codec, shared by the client and the services: what travels and how it is cut up.

    sdxl_wire.images   encoded images (PNG / JPEG) as ImageChunk streams; PIL only, no torch
    sdxl_wire.tensors  torch tensors as TensorChunk streams (dtype + shape + little-endian bytes)

This module and sdxl_wire.images import neither torch nor numpy, so the light client can use them.
"""

REQUEST_ID_KEY = "x-request-id"  # metadata key that carries a request's id to every stage
CHUNK_BYTES = 1 << 20  # data per chunk message: 1 MiB, far under gRPC's 4 MiB default message limit
# Every channel's and server's message limit: chunked streams stay small, but whole encoded images
# (PNG in or out) travel in one piece where a message carries one.
MAX_MESSAGE_BYTES = 64 * 2**20
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # the models' dtypes, by the names the flags take
