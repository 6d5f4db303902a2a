"""Channels from the orchestrator to its stages: address lists or DNS names, round robin, retry on UNAVAILABLE."""

from __future__ import annotations

import ipaddress
import json

import grpc

from .tls import ChannelTls

# Idempotent calls are retried once on UNAVAILABLE (a stopped or draining replica), on another replica by
# round robin. Denoise is too: the orchestrator always sends a seed, so a retry computes the same latents, and a
# draining replica refuses before its first step. gRPC retries only until the first response arrives.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "sdxl.v1.TextEncoder"}, {"service": "sdxl.v1.Vae"}, {"service": "sdxl.v1.Denoiser"}],
        "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.05s", "maxBackoff": "0.2s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}
RETRY_BUFFER_BYTES = 64 * 2**20  # a retried stream replays its requests: buffer a 1024 x 1024 batch's tensors


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
    """One channel to a stage's replicas: round robin, one retry on UNAVAILABLE, large messages allowed;
    TLS (verifying the stage's certificate, and showing ours for mTLS) when `tls` is given."""
    options = [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
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
