"""A fake Orchestrator on port 0 that records what it is sent and answers like the real one."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from PIL import Image

from sdxl.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from sdxl_wire import images

SMALL_CHUNK = 100  # bytes: every test image arrives in several chunks


class FakeOrchestrator(orchestrator_pb2_grpc.OrchestratorServicer):
    """Echoes one progress event per stage and step, then B solid-colour PNGs of the requested size."""

    def __init__(self):
        self.requests: list[list[orchestrator_pb2.GenerateRequest]] = []
        self.metadata: list[dict[str, str]] = []
        self.abort_with: tuple[grpc.StatusCode, str] | None = None
        self.send_result = True

    def Generate(self, request_iterator, context):
        self.metadata.append(dict(context.invocation_metadata()))
        requests = list(request_iterator)
        self.requests.append(requests)
        if self.abort_with is not None:
            context.abort(*self.abort_with)
        params = requests[0].params
        steps = params.num_inference_steps or 50
        for stage, total in ((orchestrator_pb2.STAGE_ENCODE_PROMPT, 1), (orchestrator_pb2.STAGE_BASE, steps),
                             (orchestrator_pb2.STAGE_DECODE, 1)):
            for step in range(1, total + 1):
                yield orchestrator_pb2.GenerateResponse(
                    progress=orchestrator_pb2.GenerateProgress(stage=stage, step=step, total=total))
        count = len(params.prompt) * (params.num_images_per_prompt or 1)
        size = (params.width or 64, params.height or 64)
        for index in range(count):
            png = images.to_png(Image.new("RGB", size, (40 * index, 100, 200)))
            for piece in images.chunk(png, index, SMALL_CHUNK):
                yield orchestrator_pb2.GenerateResponse(image=piece)
        seed = params.seed if params.HasField("seed") else 1234
        if self.send_result:
            yield orchestrator_pb2.GenerateResponse(result=orchestrator_pb2.GenerateResult(seed=seed, num_images=count))


@pytest.fixture
def fake_orchestrator():
    """(address, servicer) of a FakeOrchestrator serving on a free localhost port."""
    servicer = FakeOrchestrator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0).wait()


@pytest.fixture
def health_server():
    """(address, HealthServicer) of a grpc.health.v1 server on a free localhost port."""
    from grpc_health.v1 import health, health_pb2_grpc

    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0).wait()
