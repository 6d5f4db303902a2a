"""The Prometheus metrics every stage exports on --metrics-port (prometheus_client's default registry).

sdxl_requests_total{stage,method,code}         requests finished, by status code
sdxl_request_duration_seconds{stage,method}    latency including time queued (histogram)
sdxl_queue_depth{stage}                        requests waiting beyond --max-concurrency for a place in the engine
sdxl_inflight_requests{stage}                  requests the engine holds now (the autoscaling signal)
sdxl_step_duration_seconds{stage}              one denoiser engine iteration: a forward and its samplers (histogram)
sdxl_batch_size{stage,method}                  images per request (histogram)
sdxl_engine_active_jobs{stage}                 jobs the stage's engine holds now (being advanced or waiting a turn)
sdxl_engine_queue_wait_seconds{stage}          from a job's submission to its first unit of work (histogram)
sdxl_engine_rows_per_forward{stage}            rows (two per guided image) in one UNet forward or encode (histogram)
sdxl_model_info{stage,model,device,dtype}      1, for the loaded model
sdxl_accelerator_memory_bytes{stage,device,kind}  CUDA memory allocated / reserved by torch, read at scrape time
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REQUESTS = prometheus_client.Counter(
    "sdxl_requests", "Requests finished, by stage, method and status code.", ["stage", "method", "code"]
)
LATENCY = prometheus_client.Histogram(
    "sdxl_request_duration_seconds",
    "Request latency including time queued, by stage and method.",
    ["stage", "method"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),  # a 1024px denoise takes seconds
)
QUEUE_DEPTH = prometheus_client.Gauge("sdxl_queue_depth", "Requests waiting for a worker slot.", ["stage"])
IN_FLIGHT = prometheus_client.Gauge("sdxl_inflight_requests", "Requests running now.", ["stage"])
STEP = prometheus_client.Histogram(
    "sdxl_step_duration_seconds",
    "One denoising step (UNet forward(s) and the sampler's update), by stage.",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),  # fp16 H100 ~0.05 s; CPU fp32 seconds
)
BATCH = prometheus_client.Histogram(
    "sdxl_batch_size", "Images per request, by stage and method.", ["stage", "method"], buckets=(1, 2, 4, 8, 16, 32)
)
ACTIVE_JOBS = prometheus_client.Gauge("sdxl_engine_active_jobs", "Jobs the stage's engine holds now.", ["stage"])
QUEUE_WAIT = prometheus_client.Histogram(
    "sdxl_engine_queue_wait_seconds", "From a job's submission to the engine to its first unit of work.", ["stage"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
ROWS = prometheus_client.Histogram(
    "sdxl_engine_rows_per_forward", "Rows in one UNet forward (two per guided image) or one encode, by stage.",
    ["stage"], buckets=(1, 2, 4, 8, 16, 32, 64),
)
MODEL = prometheus_client.Info("sdxl_model", "The loaded model's path, device and dtype.", ["stage"])


def observe(stage: str, method: str, code: str, seconds: float) -> None:
    """Count one finished request and record its latency."""
    REQUESTS.labels(stage, method, code).inc()
    LATENCY.labels(stage, method).observe(seconds)


def track_admission(stage: str, waiting: Callable[[], float], running: Callable[[], float]) -> None:
    """Export a stage's queue depth and in-flight count, read from its admission at scrape time."""
    QUEUE_DEPTH.labels(stage).set_function(waiting)
    IN_FLIGHT.labels(stage).set_function(running)


def track_engine(stage: str, active: Callable[[], float]) -> None:
    ACTIVE_JOBS.labels(stage).set_function(active)


def observe_forward(stage: str, rows: int) -> None:
    ROWS.labels(stage).observe(rows)


def observe_queue_wait(stage: str, seconds: float) -> None:
    QUEUE_WAIT.labels(stage).observe(seconds)


def observe_step(stage: str, seconds: float) -> None:
    STEP.labels(stage).observe(seconds)


def observe_batch(stage: str, method: str, size: int) -> None:
    BATCH.labels(stage, method).observe(size)


class _AcceleratorMemory(Collector):
    """torch.cuda's allocated and reserved bytes per device, for the stages that placed a model on CUDA."""

    def __init__(self):
        self.devices: dict[str, str] = {}  # device ("cuda:0") -> stage

    def collect(self):
        family = GaugeMetricFamily("sdxl_accelerator_memory_bytes", "CUDA memory held by torch, by device.",
                                   labels=["stage", "device", "kind"])
        if self.devices:
            import torch

            for device, stage in sorted(self.devices.items()):
                family.add_metric([stage, device, "allocated"], torch.cuda.memory_allocated(device))
                family.add_metric([stage, device, "reserved"], torch.cuda.memory_reserved(device))
        yield family


ACCELERATOR_MEMORY = _AcceleratorMemory()
prometheus_client.REGISTRY.register(ACCELERATOR_MEMORY)


def model_loaded(stage: str, model: str, device: str, dtype: str) -> None:
    """Record the stage's model; on a CUDA device, also export its memory."""
    MODEL.labels(stage).info({"model": model, "device": device, "dtype": dtype})
    if device.startswith("cuda"):
        ACCELERATOR_MEMORY.devices[device if ":" in device else "cuda:0"] = stage


def start_http_server(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on `port` of `host`, written as in --address ("[::]", "0.0.0.0", "127.0.0.1")."""
    host = host.strip("[]") or "::"
    try:
        prometheus_client.start_http_server(port, host)
    except OSError:
        if host != "::":
            raise
        prometheus_client.start_http_server(port, "0.0.0.0")  # a host without IPv6: grpc's "[::]" falls back too
