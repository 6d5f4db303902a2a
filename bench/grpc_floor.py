"""What grpcio alone costs for the service chain's traffic: the floor under bench.transport's replay.

The same calls as one Generate (client -> orchestrator, then the orchestrator calling each stage in turn with
stream-stream calls), each with the same number of messages and bytes per direction as measured, but every
handler moves raw bytes: no protobuf, no tensor codec, no interceptor, no validation. Sync grpcio, servers
in this process on loopback, the message buffers kept as the services keep them (allocator.py). Whatever the
services do beyond gRPC itself sits above this number; a transport target below it needs another stack.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

# (messages, bytes) each way: "sent" to the stage (or, for "client", from the client), "received" back
Pattern = dict[str, dict[str, tuple[int, int]]]


def _messages(count: int, total: int) -> list[bytes]:
    """`count` messages adding up to `total` bytes (at least one byte each)."""
    if count == 0:
        return []
    size = max(total // count, 1)
    return [b"\0" * size for _ in range(count)]


def _identity(data: bytes) -> bytes:
    return data


def _stage_handler(replies: list[bytes]):
    def call(requests: Iterator[bytes], context) -> Iterator[bytes]:
        for _ in requests:
            pass
        yield from replies

    return grpc.stream_stream_rpc_method_handler(call, _identity, _identity)


def _server(methods: dict) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(8), options=[("grpc.max_receive_message_length", 64 << 20),
                                                                 ("grpc.max_send_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Stage", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def measure(pattern: Pattern, repeats: int) -> tuple[float, float]:
    """(best, median) ms of one chain of raw-bytes calls with `pattern`'s traffic."""
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    stages = [s for s in pattern if s != "client"]
    servers, calls = [], {}
    for stage in stages:
        server, port = _server({"Call": _stage_handler(_messages(*pattern[stage]["received"]))})
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        calls[stage] = (channel.stream_stream("/floor.Stage/Call", _identity, _identity),
                        _messages(*pattern[stage]["sent"]))
        servers.append((server, channel))
    to_client = _messages(*pattern["client"]["received"])

    def generate(requests: Iterator[bytes], context) -> Iterator[bytes]:
        for _ in requests:
            pass
        progress = iter(to_client)
        for stage in stages:  # the client's events interleave with the stage calls, as the orchestrator's do
            yield next(progress, b"")
            for _ in calls[stage][0](iter(calls[stage][1]), timeout=60):
                pass
        yield from progress

    orchestrator, port = _server({"Call": grpc.stream_stream_rpc_method_handler(generate, _identity, _identity)})
    client = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    generate_call = client.stream_stream("/floor.Stage/Call", _identity, _identity)
    requests = _messages(*pattern["client"]["sent"])
    times = []
    try:
        for i in range(repeats + 3):  # 3 warm-up calls
            start = time.perf_counter()
            for _ in generate_call(iter(requests), timeout=60):
                pass
            if i >= 3:
                times.append(time.perf_counter() - start)
    finally:
        client.close()
        orchestrator.stop(0)
        for server, channel in servers:
            channel.close()
            server.stop(0)
    return min(times) * 1e3, statistics.median(times) * 1e3
