"""Channels from the orchestrator to its stages: address lists or DNS names, round robin, keepalive."""

from __future__ import annotations

import ipaddress
import json

import grpc

from .tls import ChannelTls

# Stage calls are streams, and grpcio (1.85) hangs a stream that has a retryPolicy when its peer dies before
# answering: round_robin or pick_first, it stays blocked past its own deadline, where the same call without one
# fails UNAVAILABLE at once (tests/services/test_orchestrator.py pins this). So only the unary Describe is retried
# here; the orchestrator runs a lost stream again itself, on another replica (orchestrator.py Run.retry).
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "sdxl.v1.StageInfo"}],
        "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.05s", "maxBackoff": "0.2s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}
KEEPALIVE_S = 5.0  # ping a stage this often, even mid-call with no data moving (a long step or decode) ...
KEEPALIVE_TIMEOUT_S = 5.0  # ... and call the connection dead, failing its calls, when no answer comes this soon
RECONNECT_BACKOFF_S = (0.2, 1.0)  # first and longest wait before reconnecting: a restarted replica is back in 1 s


def channel_target(addresses: str) -> str:
    """"h1:p1,h2:p2" -> "ipv4:h1:p1,h2:p2" (or ipv6:), one "host:port" or a "scheme:..." target as it is."""
    if ":/" in addresses or addresses.split(":", 1)[0] in ("dns", "ipv4", "ipv6", "unix", "unix-abstract"):
        return addresses
    parts = [a.strip() for a in addresses.split(",") if a.strip()]
    if not parts:
        raise ValueError(f"no address in {addresses!r}")
    if len(parts) == 1:
        return parts[0]
    hosts = [p.rsplit(":", 1)[0].strip("[]") for p in parts]
    hosts = ["127.0.0.1" if h == "localhost" else h for h in hosts]
    ports = [p.rsplit(":", 1)[1] for p in parts]
    try:
        versions = {ipaddress.ip_address(h).version for h in hosts}
    except ValueError:
        raise ValueError(f"an address list takes IP addresses, got {addresses!r}; for host names use one "
                         f"dns:///name:port target") from None
    if versions == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in zip(hosts, ports))
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in zip(hosts, ports))
    raise ValueError(f"an address list must be all IPv4 or all IPv6, got {addresses!r}")


def stage_channel(addresses: str, max_message_bytes: int, tls: ChannelTls | None = None) -> grpc.Channel:
    """One channel to a stage's replicas: round robin, keepalive, large messages allowed;
    TLS (verifying the stage's certificate, and showing ours for mTLS) when `tls` is given."""
    options = [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # default 2: a long decode would go unwatched after two pings
        ("grpc.initial_reconnect_backoff_ms", int(RECONNECT_BACKOFF_S[0] * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(RECONNECT_BACKOFF_S[1] * 1000)),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Server-streaming calls (EncodePrompt) read their responses on the calling thread instead of through the
        # channel's spin thread: a thread hop less per message, and no spin thread started per call on an idle
        # channel. Iteration, cancel(), code() and details() behave the same; only Future.result() and friends no
        # longer block, and the orchestrator never calls them.
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
    ]
    target = channel_target(addresses)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options + tls.options())
