"""The one interceptor of every stage server: request id, admission, status codes, one log line per request."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from . import metrics
from .admission import Admission
from .calls import bind_request_id, ensure_active, remaining_timeout, request_id_from
from .errors import Loading, status_for

# Never queued, refused or logged: probes, tooling and Describe must get through a busy or draining server.
EXEMPT_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                             "grpc.reflection.v1.ServerReflection", "sdxl.v1.StageInfo"})

_LINE = (
    "request_id=%(request_id)s stage=%(stage)s method=%(method)s code=%(code)s "
    "queue_ms=%(queue_ms).1f total_ms=%(total_ms).1f"
)

# (request_streaming, response_streaming) -> the handler's behavior attribute and the factory that rebuilds it.
_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class StageInterceptor(grpc.ServerInterceptor):
    """Wraps each RPC of a stage's own services; health and reflection pass through untouched."""

    def __init__(self, stage: str, admission: Admission, serving: threading.Event,
                 exempt: frozenset[str] = EXEMPT_SERVICES):
        self.stage = stage
        self.admission = admission
        self.serving = serving  # set once the weights are loaded
        self.exempt = exempt
        self.log = logging.getLogger(f"sdxl.{stage}")

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.split("/")[1] in self.exempt:
            return handler
        name, factory = _KINDS[(handler.request_streaming, handler.response_streaming)]
        wrap = self._streaming if handler.response_streaming else self._unary
        return factory(wrap(method, getattr(handler, name)), handler.request_deserializer, handler.response_serializer)

    def _unary(self, method: str, behavior: Callable) -> Callable:
        def handle(request, context):
            # A fresh contextvars context per request, so the request id cannot leak into the next one.
            return contextvars.copy_context().run(self._call_unary, method, behavior, request, context)

        return handle

    def _call_unary(self, method, behavior, request, context):
        with self._call(method, context):
            return behavior(request, context)

    def _streaming(self, method: str, behavior: Callable) -> Callable:
        def handle(request, context):
            ctx = contextvars.copy_context()
            responses = self._call_streaming(method, behavior, request, context)
            try:
                while True:
                    try:
                        response = ctx.run(next, responses)
                    except StopIteration:
                        return
                    yield response
            finally:
                ctx.run(responses.close)  # grpc drops the iterator when the client leaves: finish the log line

        return handle

    def _call_streaming(self, method, behavior, request, context) -> Iterator:
        with self._call(method, context):
            yield from behavior(request, context)

    @contextmanager
    def _call(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        """Admit, run the block, map any exception to a status, then log and count the request."""
        rid = request_id_from(context.invocation_metadata())
        bind_request_id(rid)
        start = admitted = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if not self.serving.is_set():
                raise Loading("the stage is loading its weights; retry shortly")
            with self.admission.slot(lambda: ensure_active(context)):
                admitted = time.perf_counter()
                yield
            code = _final_code(context)
        except GeneratorExit:  # a response stream closed before its end: the client went away
            code = _early_end_code(context)
            raise
        except Exception as exc:
            code, message = _handler_status(context) or status_for(exc, rid)
            if code is grpc.StatusCode.INTERNAL:
                self.log.exception("request_id=%s method=%s failed", rid, method, extra={"request_id": rid})
            context.abort(code, message)
        finally:
            done = time.perf_counter()
            self._log_done(rid, method, code, (admitted - start) * 1e3, (done - start) * 1e3)

    def _log_done(self, rid: str, method: str, code: grpc.StatusCode, queue_ms: float, total_ms: float) -> None:
        fields = {
            "request_id": rid,
            "stage": self.stage,
            "method": method,
            "code": code.name,
            "queue_ms": queue_ms,
            "total_ms": total_ms,
        }
        self.log.info(_LINE, fields, extra=fields)
        metrics.observe(self.stage, method, code.name, total_ms / 1e3)


def _handler_status(context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
    """The status the handler set or aborted with before raising, if any."""
    code, details = context.code(), context.details()
    if code in (None, grpc.StatusCode.OK):
        return None
    return code, details.decode() if isinstance(details, bytes) else details or ""


def _final_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The status of a handler that returned: what it set, or how the client left if it did."""
    code = context.code()
    if code not in (None, grpc.StatusCode.OK):
        return code
    return grpc.StatusCode.OK if context.is_active() else _early_end_code(context)


def _early_end_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED if the deadline passed, else CANCELLED."""
    remaining = remaining_timeout(context)
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
