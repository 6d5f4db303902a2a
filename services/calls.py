"""Helpers over one RPC's context: request id, cancellation, deadlines and forwarding them downstream."""

from __future__ import annotations

import re
import threading
import time
import uuid
from contextvars import ContextVar

import grpc

from sdxl_wire import REQUEST_ID_KEY

from .errors import Cancelled, DeadlineExceeded

_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # keeps log lines one line and bounded
_NO_DEADLINE_S = 1e8  # grpc reports "no deadline" as a deadline centuries away

_request_id: ContextVar[str | None] = ContextVar("sdxl_request_id", default=None)


def request_id() -> str | None:
    """The id of the request this thread is serving, or None outside a request."""
    return _request_id.get()


def bind_request_id(value: str) -> None:
    """Make `value` the current request id (the interceptor calls this in each request's own context)."""
    _request_id.set(value)


def request_id_from(metadata) -> str:
    """The client's x-request-id if it sent a usable one, else a new random id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def outgoing_metadata(*extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """Metadata for a downstream call: the current request id, then `extra`, then the trace context if tracing."""
    from . import tracing  # here, not at the top: tracing reads the request id from this module

    rid = request_id()
    return (((REQUEST_ID_KEY, rid),) if rid else ()) + extra + tracing.outgoing()


def remaining_timeout(context: grpc.ServicerContext, margin_s: float = 0.0) -> float | None:
    """Seconds left before this RPC's deadline, less `margin_s`, for a downstream call; None if unbounded."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return max(remaining - margin_s, 0.0)


def deadline(context: grpc.ServicerContext) -> float | None:
    """This RPC's deadline on time.monotonic()'s clock, or None if unbounded."""
    remaining = remaining_timeout(context)
    return None if remaining is None else time.monotonic() + remaining


def call_options(context: grpc.ServicerContext, margin_s: float = 0.0) -> dict:
    """Keyword arguments that forward request id and deadline: `stub.Method(req, **call_options(context))`."""
    return {"metadata": outgoing_metadata(), "timeout": remaining_timeout(context, margin_s)}


def watch(context: grpc.ServicerContext) -> threading.Event:
    """An event set when the RPC ends: cancelled, past its deadline (grpc then cancels it) or finished."""
    ended = threading.Event()
    if not context.add_callback(ended.set):
        ended.set()  # already over
    return ended


def ensure_active(context: grpc.ServicerContext) -> None:
    """Raise DeadlineExceeded or Cancelled if the RPC has ended; stage code calls it between steps."""
    remaining = remaining_timeout(context)
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("deadline exceeded")
    if not context.is_active():
        raise Cancelled("cancelled by the client")
