"""The status code and message a client sees for each exception a servicer raises."""

from __future__ import annotations

import grpc

from sdxl_core.errors import WeightsError


class QueueFull(Exception):
    """Every worker is busy and the queue is full; the client should retry later or elsewhere."""


class Draining(Exception):
    """The server is shutting down and takes no new work; another replica should."""


class Loading(Exception):
    """The server is up but its weights are not loaded yet; retry shortly or on another replica."""


class Cancelled(Exception):
    """The client cancelled the request; stage code raises it to stop early."""


class DeadlineExceeded(Exception):
    """The request's deadline passed; stage code raises it to stop early."""


class FailedPrecondition(Exception):
    """The server cannot serve this request in its current state (e.g. the wrong model is loaded)."""


# First match wins, so subclasses come before their bases.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Draining, grpc.StatusCode.UNAVAILABLE),
    (Loading, grpc.StatusCode.UNAVAILABLE),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (WeightsError, grpc.StatusCode.FAILED_PRECONDITION),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception. Unknown ones are INTERNAL with a fixed message naming the request id:
    their text (a library's, possibly with addresses or internals) goes only to the log."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, grpc.RpcError) and not isinstance(exc, grpc.Call):
        return grpc.StatusCode.CANCELLED, "the call ended while its requests were read"  # the client went away
    if isinstance(exc, grpc.RpcError):
        # A downstream call failed: its code passes through, so UNAVAILABLE stays retryable; UNKNOWN (a stage that
        # failed outside its interceptor) is an internal error here too.
        if exc.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.INTERNAL, f"internal error; request id {request_id or 'unknown'}"
