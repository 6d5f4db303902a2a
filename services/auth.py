"""Bearer-token access (--auth-token-file): every call but health and reflection carries
`authorization: Bearer <token>`, or is refused UNAUTHENTICATED before it reaches admission."""

from __future__ import annotations

import collections
import hmac
import logging
from pathlib import Path

import grpc

AUTHORIZATION = "authorization"
# Open to probes and tooling without a token. StageInfo.Describe is not: it names the model, its path and limits.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
log = logging.getLogger("sdxl.auth")


def read_token(path: str | Path) -> str:
    """The token in `path`, surrounding whitespace stripped; ValueError if there is none."""
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def bearer(token: str) -> tuple[str, str]:
    """The metadata entry that carries `token`."""
    return AUTHORIZATION, f"Bearer {token}"


class TokenInterceptor(grpc.ServerInterceptor):
    """Lets a call through when its metadata carries the token (compared in constant time), or when its service is
    open; refuses it UNAUTHENTICATED otherwise, without running the method."""

    def __init__(self, token: str, open_services: frozenset[str] = OPEN_SERVICES):
        self._expected = bearer(token)[1].encode()
        self.open_services = open_services

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.split("/")[1] in self.open_services:
            return handler
        if self._carries_token(handler_call_details.invocation_metadata):
            return handler
        log.info("refused %s: no valid authorization token", method)
        # The method's own kind, so a streaming client is answered at once instead of waiting to send.
        factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
        return factory(_refuse)

    def _carries_token(self, metadata) -> bool:
        values = [v for k, v in metadata or () if k == AUTHORIZATION and isinstance(v, str)]
        return any(hmac.compare_digest(v.encode(), self._expected) for v in values)


def _refuse(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong authorization token (Bearer)")


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.entry = bearer(token)

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        metadata = (*(d.metadata or ()), self.entry)
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def with_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """`channel`, sending `token` on every call when one is given (the orchestrator toward its stages)."""
    return channel if token is None else grpc.intercept_channel(channel, _BearerInterceptor(token))
