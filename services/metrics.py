"""Optional Prometheus metrics per stage, method and status code; a no-op without prometheus_client."""

from __future__ import annotations

try:
    import prometheus_client
except ImportError:  # metrics are optional; the services run without them
    prometheus_client = None

if prometheus_client is not None:
    REQUESTS = prometheus_client.Counter(
        "sdxl_requests", "Requests finished, by stage, method and status code.", ["stage", "method", "code"]
    )
    LATENCY = prometheus_client.Histogram(
        "sdxl_request_seconds",
        "Request latency including time queued, by stage and method.",
        ["stage", "method"],
        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),  # a 1024px denoise takes seconds
    )


def observe(stage: str, method: str, code: str, seconds: float) -> None:
    """Count one finished request and record its latency."""
    if prometheus_client is not None:
        REQUESTS.labels(stage, method, code).inc()
        LATENCY.labels(stage, method).observe(seconds)


def start_http_server(port: int) -> None:
    """Expose /metrics on `port`; raise if prometheus_client is not installed."""
    if prometheus_client is None:
        raise RuntimeError("metrics_port is set but prometheus_client is not installed: pip install prometheus_client")
    prometheus_client.start_http_server(port)
