"""OpenTelemetry tracing across the stages: a server span per call, a client span per stage call, a span per
denoise step; the W3C trace context travels in gRPC metadata. Off (nothing recorded, handlers untouched) unless
an OTLP endpoint is configured through the standard OTEL_* variables."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter

from . import calls, describe
from .interceptors import _KINDS, EXEMPT_SERVICES

# Probes and tooling make no spans; StageInfo.Describe is a stage call of the orchestrator's, so it does.
UNTRACED = EXEMPT_SERVICES - {describe.SERVICE}
_REQUEST_ID = otel_context.create_key("sdxl.request_id")  # the request id, carried in the context to the engines

_tracer: trace.Tracer | None = None  # None: tracing is off


def exporting(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for OTLP traces: an endpoint set, the exporter not `none`, the SDK on."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip() for e in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")}
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return bool(endpoint) and "otlp" in exporters


def configure(service_name: str, provider: trace.TracerProvider | None = None) -> bool:
    """Trace into `provider`, or, when the environment names an OTLP endpoint, into a new global provider that
    batches spans to it as `service_name` (OTEL_SERVICE_NAME wins); else tracing is off. True if on."""
    global _tracer
    if provider is None and exporting():
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = os.environ.get("OTEL_SERVICE_NAME") or service_name
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    _tracer = None if provider is None else provider.get_tracer(__name__)
    return _tracer is not None


def current() -> otel_context.Context:
    """This thread's trace context, for work another thread does on its behalf (services/engine.py Job)."""
    return otel_context.get_current()


def span(name: str, *, parent: otel_context.Context | None = None, start_ns: int | None = None,
         kind: trace.SpanKind = trace.SpanKind.INTERNAL, **attributes) -> AbstractContextManager:
    """A context manager: a span, current for the block, under `parent` (default: the current context), with the
    request id as sdxl.request_id. Nothing when tracing is off."""
    if _tracer is None:
        return nullcontext()
    rid = otel_context.get_value(_REQUEST_ID, parent) or calls.request_id()
    if rid:
        attributes["sdxl.request_id"] = rid
    return _current(_tracer.start_span(name, parent, kind, attributes, start_time=start_ns), parent)


@contextmanager
def _current(span: trace.Span, parent: otel_context.Context | None) -> Iterator[trace.Span]:
    """`span` current for the block, in `parent` (so with its request id), then ended; an exception marks it."""
    # Not start_as_current_span: it puts the span in the current context, not in `parent`.
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except GeneratorExit:  # a response stream closed before its end: the client went away
        span.set_status(trace.Status(trace.StatusCode.ERROR, "the call ended before its responses"))
        raise
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        otel_context.detach(token)
        span.end()


def outgoing() -> tuple[tuple[str, str], ...]:
    """Metadata carrying the current trace context (W3C traceparent) to a downstream call; () when off."""
    if _tracer is None:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def client_span(stage: str, method: Callable | str) -> AbstractContextManager:
    """The client span "stage STAGE METHOD", current for a block that makes one stage call and reads all of it;
    `method` a stub's method or its name."""
    method = method if isinstance(method, str) else method_name(method)
    return span(f"stage {stage} {method}", kind=trace.SpanKind.CLIENT, **{"sdxl.stage": stage, "rpc.method": method})


class LongCall:
    """The client span of a stage call that outlives a block (a Denoise call opened before its inputs exist):
    current only while the call is made (`with long.current():`, so its metadata carries the span), ended by
    `end()`; other calls made in between are not its children. Nothing when tracing is off."""

    def __init__(self, stage: str, method: str):
        self._span = None
        if _tracer is not None:
            attributes = {"sdxl.stage": stage, "rpc.method": method, "sdxl.request_id": calls.request_id() or ""}
            self._span = _tracer.start_span(f"stage {stage} {method}", kind=trace.SpanKind.CLIENT,
                                            attributes=attributes)

    @contextmanager
    def current(self) -> Iterator[None]:
        if self._span is None:
            yield
            return
        token = otel_context.attach(trace.set_span_in_context(self._span))
        try:
            yield
        finally:
            otel_context.detach(token)

    def end(self) -> None:
        if self._span is not None:
            self._span.end()


def method_name(multicallable) -> str:
    # grpc's multicallables keep their path ("/sdxl.v1.Denoiser/Denoise") only in a private attribute.
    path = getattr(multicallable, "_method", b"")
    path = path.decode() if isinstance(path, bytes) else str(path)
    return path.rsplit("/", 1)[-1] or "call"


def _in_own_context(items: Iterator) -> Iterator:
    """`items`, every step run in one private copy of the current context: what the generator attaches (a
    current span) stays its own, however the steps are spread over threads and callers."""
    ctx = contextvars.copy_context()
    try:
        while True:
            try:
                item = ctx.run(next, items)
            except StopIteration:
                return
            yield item
    finally:
        ctx.run(items.close)  # grpc drops a response iterator when the client leaves: end the span


class _MetadataGetter(Getter):
    """W3C headers out of grpc's invocation metadata, a sequence of (key, value)."""

    def get(self, carrier, key: str) -> list[str] | None:
        values = [v for k, v in carrier or () if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier) -> list[str]:
        return [k for k, _ in carrier or ()]


_METADATA = _MetadataGetter()


class TracingInterceptor(grpc.ServerInterceptor):
    """Runs each RPC, the whole response stream included, inside a server span under the caller's trace context."""

    def __init__(self, stage: str):
        self.stage = stage

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if _tracer is None or handler is None or method.split("/")[1] in UNTRACED:
            return handler
        name, factory = _KINDS[(handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, name)
        wrap = self._streaming if handler.response_streaming else self._unary
        return factory(wrap(method, behavior), handler.request_deserializer, handler.response_serializer)

    def _unary(self, method: str, behavior: Callable) -> Callable:
        def handle(request, context):
            with self._span(method, context):
                return behavior(request, context)

        return handle

    def _streaming(self, method: str, behavior: Callable) -> Callable:
        def stream(request, context):
            with self._span(method, context):
                yield from behavior(request, context)

        return lambda request, context: _in_own_context(stream(request, context))

    def _span(self, method: str, context: grpc.ServicerContext):
        metadata = context.invocation_metadata()
        parent = propagate.extract(metadata, getter=_METADATA)
        # Bound by StageInterceptor when it runs first; else the one the client sent.
        rid = calls.request_id() or calls.request_id_from(metadata)
        service, rpc = method.lstrip("/").split("/", 1)
        return span(method.lstrip("/"), parent=otel_context.set_value(_REQUEST_ID, rid, parent),
                    kind=trace.SpanKind.SERVER, **{"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc,
                                                   "sdxl.stage": self.stage})


def server_interceptor(stage: str) -> grpc.ServerInterceptor:
    """The interceptor for `stage`'s server; install it after StageInterceptor, so its span has the bound id."""
    return TracingInterceptor(stage)

