"""The bootstrap every stage process shares: health, reflection, limits, admission, graceful drain."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sdxl.v1 import stage_pb2, stage_pb2_grpc
from sdxl_wire import MAX_MESSAGE_BYTES

from . import describe, metrics, tracing
from .admission import Admission
from .auth import TokenInterceptor, read_token
from .interceptors import StageInterceptor
from .tls import ServerTls

# What a server serves: (add_XServicer_to_server, servicer) from generated code, or a generic handler.
Handler = tuple[Callable[[Any, grpc.Server], None], Any] | grpc.GenericRpcHandler

_FLUSH_S = 1.0  # after in-flight work is done, time for its last responses to go out


@dataclass(frozen=True)
class ServerOptions:
    """How a stage server listens, bounds its work and shuts down."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Requests a server holds at once, and how many more wait; each stage module sets its own (OPTIONS: its engine
    # holds many, and a held request costs only its inputs).
    max_concurrency: int = 1
    max_queue: int = 4
    grace_s: float = 25.0  # under Kubernetes' default 30 s terminationGracePeriodSeconds, so we exit before SIGKILL
    keepalive_time_s: float = 30.0  # ping idle clients so half-open connections are found and closed
    keepalive_timeout_s: float = 10.0
    min_client_ping_interval_s: float = 4.0  # clients may ping this often without GOAWAY (stage channels: 5 s)
    extra_threads: int = 4  # beyond admitted work, so health checks, reflection and refusals never wait for it
    metrics_port: int | None = None  # serve Prometheus /metrics here when set
    tls: ServerTls | None = None  # serve TLS (mTLS with a client CA) instead of plaintext
    # Plaintext grpc.health.v1 alone on this port: Kubernetes' gRPC probes cannot speak TLS.
    health_port: int | None = None
    # Every call but health and reflection must carry `authorization: Bearer <the file's token>`.
    auth_token_file: str | None = None

    def __post_init__(self):
        if self.max_concurrency < 1 or self.max_queue < 0 or self.extra_threads < 1:
            raise ValueError(
                f"need max_concurrency >= 1, max_queue >= 0, extra_threads >= 1; got {self.max_concurrency}, "
                f"{self.max_queue}, {self.extra_threads}"
            )
        if self.grace_s < 0 or self.max_message_bytes < 1:
            raise ValueError(
                f"need grace_s >= 0 and max_message_bytes >= 1; got {self.grace_s}, {self.max_message_bytes}"
            )

    def grpc_options(self) -> list[tuple[str, int]]:
        """The options for grpc.server()."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.min_client_ping_interval_s * 1000)),
            ("grpc.so_reuseport", 0),  # a second process on the same port fails instead of silently sharing it
        ]


class Pending:
    """Stands in for a servicer while the weights load, so the server can listen first: each method forwards
    to `servicer` once it is set (the interceptor lets no call through before the server is SERVING)."""

    def __init__(self):
        self.servicer = None

    def __getattr__(self, name: str):
        def forward(request, context):
            return getattr(self.servicer, name)(request, context)

        return forward


class Server:
    """One stage's gRPC server; health reads NOT_SERVING, and every call but health, reflection and Describe
    UNAVAILABLE, until set_serving()."""

    def __init__(
        self,
        stage: str,
        handlers: Iterable[Handler],
        service_names: Sequence[str],
        address: str = "[::]:0",
        options: ServerOptions = ServerOptions(),
        on_stop: Callable[[], None] | None = None,
    ):
        self.stage = stage
        self.host = address.rsplit(":", 1)[0]  # the metrics port listens here too
        self.on_stop = on_stop  # after the last response went out: release what the handlers held
        self.options = options
        self.service_names = tuple(service_names)
        self.admission = Admission(options.max_concurrency, options.max_queue)
        metrics.track_admission(stage, lambda: self.admission.waiting, lambda: self.admission.running)
        self.health = health.HealthServicer()
        self.info = describe.StageInfoServicer()
        self.log = logging.getLogger(f"sdxl.{stage}")
        self._stopped = threading.Event()
        self.serving = threading.Event()
        workers = options.max_concurrency + options.max_queue + options.extra_threads
        # Tracing inside the stage's own interceptor: its spans carry the request id that one binds.
        interceptors = [StageInterceptor(stage, self.admission, self.serving), tracing.server_interceptor(stage)]
        if options.auth_token_file is not None:  # first, so a refused call is never admitted, queued or logged
            interceptors.insert(0, TokenInterceptor(read_token(options.auth_token_file)))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"sdxl-{stage}"),
            interceptors=interceptors,
            options=options.grpc_options(),
        )
        for handler in handlers:
            if isinstance(handler, grpc.GenericRpcHandler):
                self._server.add_generic_rpc_handlers((handler,))
            else:
                add, servicer = handler
                add(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        stage_pb2_grpc.add_StageInfoServicer_to_server(self.info, self._server)
        reflection.enable_server_reflection(
            (*self.service_names, describe.SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if options.tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, options.tls.credentials())
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        self._health_server, self.health_port = None, None
        if options.health_port is not None:
            self._health_server = grpc.server(futures.ThreadPoolExecutor(2, thread_name_prefix="sdxl-health"))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            health_address = f"{address.rsplit(':', 1)[0]}:{options.health_port}"
            self.health_port = self._health_server.add_insecure_port(health_address)
            if self.health_port == 0:
                raise RuntimeError(f"could not bind the health port {health_address}")

    def start(self) -> int:
        """Start serving (health NOT_SERVING) and return the bound port."""
        self._server.start()
        if self._health_server is not None:
            self._health_server.start()
        if self.options.metrics_port is not None:
            metrics.start_http_server(self.options.metrics_port, self.host)
        self.log.info("stage %s listening on port %d", self.stage, self.port)
        return self.port

    def set_serving(self, description: stage_pb2.StageDescription | None = None,
                    live: Callable[[], stage_pb2.StageDescription] | None = None) -> None:
        """Serve, and report SERVING for every service; call once the weights are loaded. `description` is what
        the servicer says of its model; the server adds its own stage name, limits and version. `live`, if given,
        adds what may change while serving to each Describe."""
        info = stage_pb2.StageDescription(stage=self.stage, version=describe.package_version())
        info.limits.MergeFrom(stage_pb2.StageLimits(
            max_concurrency=self.options.max_concurrency, max_queue=self.options.max_queue,
            max_message_bytes=self.options.max_message_bytes))
        if description is not None:
            info.MergeFrom(description)
        self.info.description, self.info.live = info, live
        self.serving.set()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _set_health(self, status: int) -> None:
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, new and queued work UNAVAILABLE, running work gets `grace` seconds."""
        grace = self.options.grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        self.health.enter_graceful_shutdown()
        self.admission.close()
        if not self.admission.wait_idle(grace):
            self.log.warning(
                "grace of %.1f s is over with %d request(s) running; cancelling them", grace, self.admission.in_flight
            )
        # Not the whole remaining grace: an open health Watch stream would hold the server for all of it.
        self._server.stop(min(max(deadline - time.monotonic(), 0.0), _FLUSH_S)).wait()
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        if self.on_stop is not None:
            self.on_stop()
        self._stopped.set()
        self.log.info("stage %s stopped", self.stage)

    def run_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop(); call from the main thread. A second signal is not caught."""
        received = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: received.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not (received.is_set() or self._stopped.is_set()):
                received.wait(0.5)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if received.is_set():
            self.log.info("stage %s received a stop signal; draining", self.stage)
            self.stop()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self._stopped.is_set():
            self.stop(0)
