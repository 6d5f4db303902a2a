"""SDXLClient and AsyncSDXLClient: Orchestrator.Generate with the in-process pipelines' arguments."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from sdxl.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from sdxl_wire import MAX_MESSAGE_BYTES, REQUEST_ID_KEY
from sdxl_wire import images as img

from . import params as prm

CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

ProgressFn = Callable[[str, int, int], object]  # (stage name, steps done, total); may return an awaitable (async)


class ProtocolError(RuntimeError):
    """The server's Generate stream broke the contract of orchestrator.proto."""


@dataclass(frozen=True)
class GenerateResult:
    """What Generate returned: the images, the seed that reproduces them, and the request id."""

    images: list[Image.Image]
    seed: int
    request_id: str
    png: list[bytes] = field(repr=False, default_factory=list)  # the images' bytes as the server encoded them


class _Collector:
    """Folds GenerateResponse events into a GenerateResult, calling on_progress on the way."""

    def __init__(self, on_progress: ProgressFn | None):
        self.on_progress = on_progress
        self.assembler = img.ImageAssembler()
        self.result: orchestrator_pb2.GenerateResult | None = None

    def feed(self, response: orchestrator_pb2.GenerateResponse):
        """Take one event; returns on_progress's return value (an awaitable for async callbacks)."""
        if self.result is not None:
            raise ProtocolError(f"an event after GenerateResult: {response.WhichOneof('event')}")
        kind = response.WhichOneof("event")
        if kind == "progress":
            p = response.progress
            if self.on_progress is not None:
                return self.on_progress(prm.STAGE_NAMES.get(p.stage, str(p.stage)), p.step, p.total)
        elif kind == "image":
            self.assembler.add(response.image)
        elif kind == "result":
            self.result = response.result
        else:
            raise ProtocolError(f"unexpected event {kind!r}; this client asks for OUTPUT_FORMAT_PNG")
        return None

    def finish(self, request_id: str) -> GenerateResult:
        """The GenerateResult; raises ProtocolError when the stream ended early or the counts disagree."""
        if self.result is None:
            raise ProtocolError("the stream ended without a GenerateResult")
        png = self.assembler.images()
        if len(png) != self.result.num_images:
            raise ProtocolError(f"GenerateResult says {self.result.num_images} images; {len(png)} arrived")
        return GenerateResult([img.from_bytes(b) for b in png], self.result.seed, request_id, png)


def _prepare(prompt, image, mask_image, kwargs: dict) -> list[orchestrator_pb2.GenerateRequest]:
    # Encoded up front: an error in a request iterator would surface as a bare CANCELLED.
    images, masks = prm.encode_all(image), prm.encode_all(mask_image)
    params = prm.generate_params(prompt, has_image=bool(images), has_mask=bool(masks), **kwargs)
    return list(prm.requests(params, images, masks))


class _Base:
    def __init__(self, address: str, timeout: float | None = None, metadata: Sequence[tuple[str, str]] = (),
                 token: str | None = None):
        self.address = address
        self.timeout = timeout
        # A server started with --auth-token-file wants the token on every call but health.
        self.metadata = tuple(metadata) + ((("authorization", f"Bearer {token}"),) if token else ())

    def _call_options(self, request_id: str | None, timeout: float | None) -> tuple[str, dict]:
        rid = request_id or uuid.uuid4().hex
        metadata = ((REQUEST_ID_KEY, rid), *self.metadata)
        return rid, {"metadata": metadata, "timeout": self.timeout if timeout is None else timeout}


class SDXLClient(_Base):
    """A blocking client of the orchestrator. gRPC errors reach the caller as grpc.RpcError (code, details)."""

    def __init__(self, address: str, timeout: float | None = None, metadata: Sequence[tuple[str, str]] = (),
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None):
        super().__init__(address, timeout, metadata, token)
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self.stub = orchestrator_pb2_grpc.OrchestratorStub(self.channel)

    def generate(self, prompt, *, image=None, mask_image=None, on_progress: ProgressFn | None = None,
                 request_id: str | None = None, timeout: float | None = None, **kwargs) -> GenerateResult:
        """Generate images; kwargs are the pipelines' arguments (see params.generate_params), prompt_syntax="compel"
        among them for compel's weights and prompts longer than 77 tokens."""
        requests = _prepare(prompt, image, mask_image, kwargs)
        rid, options = self._call_options(request_id, timeout)
        collector = _Collector(on_progress)
        call = self.stub.Generate(iter(requests), **options)
        try:
            for response in call:
                collector.feed(response)
        except BaseException:
            call.cancel()  # on a callback's error or Ctrl-C too, so the server stops working for nobody
            raise
        return collector.finish(rid)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The grpc.health.v1 status name of `service` ("" is the whole server), e.g. "SERVING"."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> SDXLClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSDXLClient(_Base):
    """The asyncio (grpc.aio) client: the same generate and health, as coroutines."""

    def __init__(self, address: str, timeout: float | None = None, metadata: Sequence[tuple[str, str]] = (),
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None):
        super().__init__(address, timeout, metadata, token)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self.stub = orchestrator_pb2_grpc.OrchestratorStub(self.channel)

    async def generate(self, prompt, *, image=None, mask_image=None, on_progress: ProgressFn | None = None,
                       request_id: str | None = None, timeout: float | None = None, **kwargs) -> GenerateResult:
        """Generate images; on_progress may be a plain function or a coroutine function."""
        requests = _prepare(prompt, image, mask_image, kwargs)
        rid, options = self._call_options(request_id, timeout)
        collector = _Collector(on_progress)
        call = self.stub.Generate(iter(requests), **options)
        try:
            async for response in call:
                returned = collector.feed(response)
                if inspect.isawaitable(returned):
                    await returned
        except BaseException:
            call.cancel()
            raise
        return collector.finish(rid)

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The grpc.health.v1 status name of `service` ("" is the whole server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncSDXLClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
