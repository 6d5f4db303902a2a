"""The stage engine against taking turns: mixed traffic, a burst, the per-row cost curve, and GPU batching.

Run with `make bench` (or `python -m bench.engine [--seconds S] [--full-size N] [--only traffic,burst,curve,gpu]`;
a quick run: `--seconds 20 --full-size 512`).

a. Mixed traffic: 8 clients (SDXLClient) in a closed loop for --seconds against `sdxl serve --all`'s processes
   (services/launch.py's Cluster) on the tiny model; half send previews (256x256, 4 steps, no refiner, priority
   interactive), half full requests (1024x1024, 20 steps, the ensemble refiner). Once per configuration:
   every stage taking turns (`--policy fifo`); the engine (`--policy batch`) with every decode whole
   (`--vae-whole-pixels` 4096x4096: no tile scheduling); the engine with the VAE's default (decodes over
   512x512 a decoder layer at a time, previews taking turns between the pieces: tile scheduling); with
   --vae-tile PIXELS also the engine with `--vae-tile PIXELS` (tiled decodes). Stage processes, not
   servers in this process: each stage then has its own interpreter lock and its own share of the cores
   (`--threads`, split by the launcher) as deployed, and the clients' threads do not slow the stages down.
   Before the clock starts each class runs twice at once, so the engine measures its row budgets
   (denoise_engine.calibrate) outside the window; the stages' budget log lines are shown. Each stage process
   serves /metrics (--metrics-port); its sdxl_engine_queue_wait_seconds histogram, read before and after the
   window, gives the time jobs waited at each stage (all requests: the histogram has no class label).
b. Burst: 32 previews at once against the engine's cluster (default stage flags): completed and refused.
c. The per-row cost of one UNet forward, rows 1..16, tiny and mid-size configs, 256/512/1024 px, on this
   machine, and the budget calibrate picks from it; combinations predicted over --curve-budget are cut short.
d. With CUDA: 8 concurrent 1024x1024 30-step Denoise calls in float16 on the full SDXL base UNet (random
   weights, nothing downloaded), the engine against fifo: images/s and peak memory (`--only gpu` alone).

Ratios are against the fifo run of the same invocation; nothing passes or fails.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from sdxl.v1 import denoiser_pb2, denoiser_pb2_grpc
from sdxl_client import SDXLClient
from sdxl_core.configs import SDXL_BASE_UNET, SDXL_SCHEDULER_CONFIG, TINY_BASE_UNET, UNetConfig
from sdxl_core.loading.components import empty_unet
from sdxl_core.loading.strict import TensorSpec, load_strict
from sdxl_core.tiny import ensure_tiny_model
from sdxl_services.budget import calibrate
from sdxl_services.denoise_engine import MIN_ROWS
from sdxl_services.denoiser import DenoiserServicer, make_server
from sdxl_services.launch import Cluster, ServeOptions, StageProcess, free_port
from sdxl_wire.tensors import to_proto_chunks

SECTIONS = ("traffic", "burst", "curve", "gpu")
PROMPT = "an astronaut riding a horse on the moon"
TIMEOUT_S = 900.0  # one request's deadline: a full request waits behind many others under fifo
BACKOFF_S = 0.5  # a refused client waits this long before its next request, so refusals do not spin
WARMUP_STEPS = 5  # the warm-up needs overlapping jobs of each latent size, not the whole schedule
WHOLE_DECODES = 4096 * 4096  # --vae-whole-pixels that lets every decode run whole (the VAE's largest image)
DEFAULT_WHOLE_PIXELS = 512 * 512  # the VAE's default --vae-whole-pixels (services/vae.py WHOLE_DECODE_PIXELS)
QUEUE_WAIT = "sdxl_engine_queue_wait_seconds"
WAIT_STAGES = ("text_encoder", "base", "refiner", "vae")
# The mid-size of bench/core_vs_diffusers.py (not imported: that pulls in diffusers): SDXL's three levels and
# head width, two fifths of its channels, fewer transformer layers; 148M parameters against the base's 2.6B.
MID_UNET = replace(
    SDXL_BASE_UNET, block_out_channels=(128, 256, 512), num_attention_heads=(2, 4, 8),
    transformer_layers_per_block=(1, 2, 2), cross_attention_dim=1024, pooled_projection_dim=512,
)


# --- requests and what came of them


@dataclass(frozen=True)
class RequestClass:
    """One kind of request in the traffic."""

    name: str
    size: int
    steps: int
    refiner: str = "none"
    priority: str = "default"

    def kwargs(self, seed: int) -> dict:
        return {"height": self.size, "width": self.size, "num_inference_steps": self.steps, "refiner": self.refiner,
                "priority": self.priority, "seed": seed}


@dataclass(frozen=True)
class Outcome:
    """One request: its class, when it ended, and its latency or its gRPC status code."""

    kind: str
    ended: float  # seconds from the start of the run
    latency: float
    images: int = 0
    code: str | None = None  # None: it succeeded


@dataclass
class ClassStats:
    """Per class: completed requests, latency percentiles of those, images/s, failures by code."""

    name: str
    done: int
    p50: float
    p95: float
    images_per_s: float
    failed: Counter = field(default_factory=Counter)

    @property
    def refused(self) -> int:
        return self.failed["RESOURCE_EXHAUSTED"]

    @classmethod
    def of(cls, name: str, outcomes: list[Outcome]) -> ClassStats:
        """Images/s over the time from the start to the class's last completion."""
        ok = [o for o in outcomes if o.kind == name and o.code is None]
        latencies = [o.latency for o in ok] or [math.nan]
        span = max((o.ended for o in ok), default=math.nan)
        return cls(name, len(ok), float(np.percentile(latencies, 50)), float(np.percentile(latencies, 95)),
                   sum(o.images for o in ok) / span, Counter(o.code for o in outcomes if o.kind == name and o.code))


def send(client: SDXLClient, kind: RequestClass, seed: int, start: float) -> Outcome:
    """One Generate through the client library."""
    began = time.perf_counter()
    try:
        result = client.generate(PROMPT, timeout=TIMEOUT_S, **kind.kwargs(seed))
    except grpc.RpcError as e:
        return Outcome(kind.name, time.perf_counter() - start, time.perf_counter() - began, code=e.code().name)
    return Outcome(kind.name, time.perf_counter() - start, time.perf_counter() - began, len(result.images))


def closed_loop(address: str, kinds: list[RequestClass], seconds: float) -> list[Outcome]:
    """One client per entry of `kinds`, each sending its class back to back until `seconds` are over; the
    requests in flight then finish."""
    start, outcomes, lock = time.perf_counter(), [], threading.Lock()

    def client_loop(index: int, kind: RequestClass) -> None:
        with SDXLClient(address) as client:
            for n in range(10**9):
                if time.perf_counter() - start > seconds:
                    return
                outcome = send(client, kind, seed=index * 10**6 + n, start=start)
                with lock:
                    outcomes.append(outcome)
                if outcome.code is not None:
                    time.sleep(BACKOFF_S)

    run_all([lambda i=i, k=k: client_loop(i, k) for i, k in enumerate(kinds)])
    return outcomes


def at_once(address: str, kinds: list[RequestClass]) -> list[Outcome]:
    """One request of each entry of `kinds`, all released together."""
    start, barrier = time.perf_counter(), threading.Barrier(len(kinds))

    def one(index: int, kind: RequestClass) -> Outcome:
        with SDXLClient(address) as client:
            barrier.wait()
            return send(client, kind, seed=index, start=start)

    return run_all([lambda i=i, k=k: one(i, k) for i, k in enumerate(kinds)])


def run_all(jobs: list[Callable]) -> list:
    """Each job on its own thread; their results, in order."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


# --- a, b: traffic through the processes of `sdxl serve --all`


class BudgetLines:
    """A Cluster echo that keeps the stages' row-budget lines (the engine's calibration) and drops the rest."""

    def __init__(self):
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        if "row budget" in text:
            self.lines.append(f"{text.split(']')[0]}] {text[text.index('row budget'):].strip()}")

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class Config:
    """One cluster configuration of the mixed traffic: the stages' policy and the VAE's decode flags."""

    name: str
    policy: str
    about: str
    vae_whole_pixels: int | None = None
    vae_tile: int | None = None

    def flags(self) -> str:
        flags = [f"--policy {self.policy}"]
        flags += [f"--vae-whole-pixels {self.vae_whole_pixels}"] if self.vae_whole_pixels else []
        flags += [f"--vae-tile {self.vae_tile}"] if self.vae_tile else []
        return " ".join(flags)


FIFO = Config("fifo", "fifo", "every stage takes turns")
WHOLE = Config("whole", "batch", "engine, every decode whole: without tile scheduling", vae_whole_pixels=WHOLE_DECODES)
PIECES = Config("pieces", "batch", "engine, VAE defaults: decodes over 512x512 a decoder layer at a time, others "
                "between: with tile scheduling")


def traffic_configs(args: argparse.Namespace) -> list[Config]:
    tiled = [Config(f"tile{args.vae_tile}", "batch", f"engine, decodes over {args.vae_tile} px a side a tile at a "
                    "time, others between", vae_tile=args.vae_tile)]
    return [FIFO, WHOLE, PIECES, *(tiled if args.vae_tile else [])]


@dataclass(frozen=True)
class MeteredOptions(ServeOptions):
    """ServeOptions whose stage processes also serve Prometheus /metrics, each on a free port (by process name)."""

    metrics_ports: dict[str, int] = field(default_factory=dict, compare=False)

    def stage_args(self, process: StageProcess) -> list[str]:
        port = self.metrics_ports.setdefault(process.name, free_port())
        return [*super().stage_args(process), "--metrics-port", str(port)]


@dataclass(frozen=True)
class WaitHistogram:
    """One stage's sdxl_engine_queue_wait_seconds: jobs, their total wait, cumulative counts by upper bound."""

    count: float = 0.0
    total: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count), ascending, +Inf last

    def __sub__(self, before: WaitHistogram) -> WaitHistogram:
        return self + WaitHistogram(-before.count, -before.total, tuple((le, -n) for le, n in before.buckets))

    def __add__(self, other: WaitHistogram) -> WaitHistogram:
        buckets = dict(self.buckets)
        for le, n in other.buckets:
            buckets[le] = buckets.get(le, 0.0) + n
        return WaitHistogram(self.count + other.count, self.total + other.total, tuple(sorted(buckets.items())))

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """As Prometheus' histogram_quantile: linear within the bucket holding rank q * count; past the highest
        finite bound, that bound."""
        if not self.count:
            return math.nan
        rank, lower, below = q * self.count, 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank:
                if math.isinf(le):
                    return lower
                return lower + (le - lower) * ((rank - below) / (n - below) if n > below else 1.0)
            lower, below = le, n
        return lower


def queue_waits(text: str) -> dict[str, WaitHistogram]:
    """The sdxl_engine_queue_wait_seconds histograms in a /metrics page, by their stage label."""
    parts: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(QUEUE_WAIT):
                continue
            part = parts.setdefault(sample.labels.get("stage", "?"), {"buckets": {}})
            suffix = sample.name[len(QUEUE_WAIT):]
            if suffix == "_bucket":
                part["buckets"][float(sample.labels["le"])] = sample.value
            elif suffix in ("_count", "_sum"):
                part[suffix] = sample.value
    return {stage: WaitHistogram(p.get("_count", 0.0), p.get("_sum", 0.0), tuple(sorted(p["buckets"].items())))
            for stage, p in parts.items()}


def read_waits(ports: dict[str, int]) -> dict[str, WaitHistogram]:
    """Each stage process's queue-wait histogram, by process name (one it could not be read from is left out)."""
    waits = {}
    for name, port in ports.items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                found = queue_waits(response.read().decode())
        except OSError as e:
            print(f"  {name}: /metrics on port {port} unreadable: {e}")
            continue
        if found:
            waits[name] = sum(found.values(), start=WaitHistogram())
    return waits


@dataclass
class TrafficRun:
    config: Config
    stats: dict[str, ClassStats]
    placed: dict[str, str]
    budgets: list[str]
    waits: dict[str, WaitHistogram] = field(default_factory=dict)  # the window's, by stage process
    burst: list[Outcome] | None = None
    burst_s: float = 0.0

    @property
    def policy(self) -> str:
        return self.config.policy


def cluster_options(config: Config, max_batch_rows: int | None) -> MeteredOptions:
    tiny = ensure_tiny_model()
    return MeteredOptions(base_model=str(tiny / "base"), refiner_model=str(tiny / "refiner"), host="127.0.0.1",
                          port=0, policy=config.policy, max_batch_rows=max_batch_rows, vae_tile=config.vae_tile,
                          vae_whole_pixels=config.vae_whole_pixels, start_timeout_s=600, grace_s=10)


def traffic_run(config: Config, kinds: list[RequestClass], args: argparse.Namespace, burst: RequestClass | None
                ) -> TrafficRun:
    """Start the cluster of `config`, warm it, run the closed loop (if --seconds) with the stages' queue waits
    read before and after it, and the burst (if given)."""
    lines, options = BudgetLines(), cluster_options(config, args.max_batch_rows)
    with Cluster(options, echo=lines) as cluster:
        stats, waits = {}, {}
        if args.seconds > 0:
            classes = list(dict.fromkeys(kinds))
            at_once(cluster.address, [replace(k, steps=min(k.steps, WARMUP_STEPS)) for k in classes for _ in (0, 1)])
            before = read_waits(options.metrics_ports)
            outcomes = closed_loop(cluster.address, kinds, args.seconds)
            after = read_waits(options.metrics_ports)
            stats = {k.name: ClassStats.of(k.name, outcomes) for k in classes}
            waits = {name: wait - before.get(name, WaitHistogram()) for name, wait in after.items()}
        run = TrafficRun(config, stats, cluster.placed(), lines.lines, waits)
        if burst is not None:
            began = time.perf_counter()
            run.burst = at_once(cluster.address, [burst] * args.burst)
            run.burst_s = time.perf_counter() - began
        if (dead := cluster.failed()) is not None:
            print(dead.describe_failure("stopped during the run"))
    return run


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def print_traffic(runs: list[TrafficRun], args: argparse.Namespace) -> None:
    print(f"\n== a. mixed traffic: {args.clients} clients in a closed loop for {args.seconds:g} s per configuration, "
          "tiny model, one process per stage")
    print("stage processes: " + ", ".join(f"{name} {placed}" for name, placed in runs[0].placed.items()))
    for run in runs:
        print(f"  {run.config.name:<8} {run.config.flags()}: {run.config.about}")
    if args.full_size**2 <= DEFAULT_WHOLE_PIXELS:
        print(f"  note: {args.full_size}x{args.full_size} decodes are within the default --vae-whole-pixels: "
              "'pieces' decodes them whole too (use --full-size 768 or more)")
    print(f"{'config':<8} {'class':<8} {'done':>5} {'p50 s':>7} {'p95 s':>7} {'images/s':>9} {'refused':>8}  errors")
    for run in runs:
        for s in run.stats.values():
            print(f"{run.config.name:<8} {s.name:<8} {s.done:>5} {s.p50:>7.2f} {s.p95:>7.2f} {s.images_per_s:>9.3f} "
                  f"{s.refused:>8}  {other_errors(s.failed)}")
        for line in run.budgets:
            print(f"  {run.config.name}: {line}")
    fifo = runs[0].stats
    print("ratios against fifo:")
    for run in runs[1:]:
        s = run.stats
        print(f"  {run.config.name:<8} preview p95 {ratio(s['preview'].p95, fifo['preview'].p95):.2f} (target <= 0.3), "
              f"full images/s {ratio(s['full'].images_per_s, fifo['full'].images_per_s):.2f} (target >= 0.95), "
              f"refused {sum(c.refused for c in fifo.values())} -> {sum(c.refused for c in s.values())}")
    whole = next(r for r in runs if r.config is WHOLE).stats["preview"].p95
    for run in runs:
        if run.config.policy == "batch" and run.config is not WHOLE:
            p95 = run.stats["preview"].p95
            print(f"preview p95 with vs without tile scheduling ({run.config.name} / whole): {p95:.2f} s / "
                  f"{whole:.2f} s = {ratio(p95, whole):.2f}")
    print_waits(runs)


def print_waits(runs: list[TrafficRun]) -> None:
    print("queue wait per stage over the window (sdxl_engine_queue_wait_seconds: submission to first unit of work),\n"
          "  mean / p95 (from the buckets) in s (jobs); previews and full requests together (the histogram has no\n"
          "  class label); the refiner serves full requests only")
    print(f"{'config':<8} " + " ".join(f"{stage:>24}" for stage in WAIT_STAGES))
    for run in runs:
        cells = []
        for stage in WAIT_STAGES:
            w = run.waits.get(stage)
            cells.append("-" if w is None else f"{w.mean:.3f} / {w.quantile(0.95):.3f} ({w.count:.0f})")
        print(f"{run.config.name:<8} " + " ".join(f"{cell:>24}" for cell in cells))


def other_errors(failed: Counter) -> str:
    """Failures other than refusals, by status code."""
    return ", ".join(f"{code} {n}" for code, n in failed.items() if code != "RESOURCE_EXHAUSTED") or "-"


def print_burst(run: TrafficRun, kind: RequestClass) -> None:
    done = [o for o in run.burst if o.code is None]
    failed = Counter(o.code for o in run.burst if o.code is not None)
    latencies = [o.latency for o in done] or [math.nan]
    print(f"\n== b. burst: {len(run.burst)} requests at once ({kind.size}x{kind.size}, {kind.steps} steps, priority "
          f"{kind.priority}) against the {run.config.name} cluster ({run.config.flags()}, other stage flags default)")
    print(f"completed {len(done)}, refused {failed['RESOURCE_EXHAUSTED']}, other errors {other_errors(failed)}; p50 "
          f"{np.percentile(latencies, 50):.2f} s, p95 {np.percentile(latencies, 95):.2f} s, all done in "
          f"{run.burst_s:.1f} s")


# --- c: the per-row cost curve


def random_unet(config: UNetConfig, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A UNet of `config` with random weights made on `device`: LeCun-normal matrices, unit norms, zero biases
    (activations stay O(1), so no denormals slow the CPU down)."""
    model = empty_unet(config)
    generator = torch.Generator(device).manual_seed(0)

    def sampler(name: str, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
        if len(shape) >= 2:
            return lambda: torch.randn(shape, generator=generator, device=device) / math.sqrt(math.prod(shape[1:]))
        return lambda: (torch.ones if name.endswith(".weight") else torch.zeros)(shape, device=device)

    specs = [TensorSpec(name, tuple(t.shape), sampler(name, tuple(t.shape))) for name, t in model.state_dict().items()]
    return load_strict(model, specs, "random weights", dtype=dtype, device=device).eval()


def unet_rows(config: UNetConfig, rows: int, latent: int, device: str, dtype: torch.dtype) -> tuple:
    """Random inputs of one forward: sample, timestep, context, pooled, time ids."""
    g = torch.Generator("cpu").manual_seed(rows)
    sample = torch.randn(rows, config.in_channels, latent, latent, generator=g)
    context = torch.randn(rows, 77, config.cross_attention_dim, generator=g)
    pooled = torch.randn(rows, config.pooled_projection_dim, generator=g)
    side = float(latent * 8)
    time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side][: config.num_time_ids]] * rows)
    floats = [t.to(device, dtype) for t in (sample, context, pooled, time_ids)]
    return floats[0], torch.full((rows,), 500.0, device=device), *floats[1:]


def time_forward(unet: torch.nn.Module, inputs: tuple) -> float:
    cuda = inputs[0].device.type == "cuda"
    began = time.perf_counter()
    with torch.no_grad():
        unet(*inputs)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - began


@dataclass
class Curve:
    """Seconds per row at each row count measured; what stopped it early; the budget calibrate picks."""

    config: str
    latent: int
    per_row: dict[int, float]
    cut: str = ""
    budget: int | None = None


def measure_curve(name: str, unet: torch.nn.Module, config: UNetConfig, latent: int, max_rows: int, budget_s: float,
                  repeats: int = 2) -> Curve:
    """Rows 1, 2, 4, ... max_rows, best of `repeats` after a warm-up; stops before a row count whose predicted
    time (linear in rows from the last one) would take the combination past `budget_s`."""
    spent = time_forward(unet, unet_rows(config, 1, latent, "cpu", torch.float32))  # warm-up
    curve, rows, per_row = Curve(name, latent, {}), 1, spent
    while rows <= max_rows:
        predicted = repeats * rows * per_row
        if spent + predicted > budget_s:
            curve.cut = f"rows >= {rows} skipped: ~{predicted:.0f} s more, past the {budget_s:g} s budget"
            break
        inputs = unet_rows(config, rows, latent, "cpu", torch.float32)
        times = [time_forward(unet, inputs) for _ in range(repeats)]
        spent += sum(times)
        per_row = curve.per_row[rows] = min(times) / rows
        rows *= 2
    if max(curve.per_row, default=0) >= MIN_ROWS:  # what the engine would keep, from these timings (first: a guided image)
        seconds = {r: c * r for r, c in curve.per_row.items()}
        curve.budget, _ = calibrate(seconds.__getitem__, MIN_ROWS, max(curve.per_row))
    return curve


def curve_section(args: argparse.Namespace) -> list[Curve]:
    print_curve_header(args)
    curves = []
    for name, config in (("tiny", TINY_BASE_UNET), ("mid", MID_UNET)):
        unet = random_unet(config)
        for size in args.curve_sizes:
            curves.append(measure_curve(name, unet, config, size // 8, args.curve_rows, args.curve_budget))
            print_curve_row(curves[-1], args.curve_rows)
    return curves


def print_curve_header(args: argparse.Namespace) -> None:
    print(f"\n== c. seconds per row of one UNet forward (cpu, float32, {torch.get_num_threads()} torch threads, best "
          f"of 2 after a warm-up; tiny: TINY_BASE_UNET, 2.1M parameters; mid: SDXL's layout at channels "
          f"{MID_UNET.block_out_channels}, 148M); 'budget': the rows calibrate keeps from these timings")
    counts = [2**i for i in range(int(math.log2(args.curve_rows)) + 1)]
    print(f"{'config':<6} {'px':>5} {'latents':>8} " + " ".join(f"{r:>8}" for r in counts) + f" {'budget':>7}")


def print_curve_row(curve: Curve, max_rows: int) -> None:
    counts = [2**i for i in range(int(math.log2(max_rows)) + 1)]
    cells = " ".join(f"{curve.per_row[r]:>8.4f}" if r in curve.per_row else f"{'-':>8}" for r in counts)
    side = f"{curve.latent}x{curve.latent}"
    print(f"{curve.config:<6} {curve.latent * 8:>5} {side:>8} {cells} {curve.budget or '-':>7}"
          + (f"  ({curve.cut})" if curve.cut else ""), flush=True)


# --- d: Denoise calls through the denoiser stage, engine against fifo


@dataclass
class ServingRun:
    policy: str
    seconds: float
    images: int
    peak_bytes: int | None
    budget: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def denoise_messages(config: UNetConfig, size: int, steps: int, seed: int, dtype: torch.dtype) -> list:
    """One guided text2img Denoise call's request stream, with random prompt embeddings."""
    g = torch.Generator("cpu").manual_seed(seed)
    shapes = {"prompt_embeds": (1, 77, config.cross_attention_dim),
              "pooled_prompt_embeds": (1, config.pooled_projection_dim)}
    shapes |= {f"negative_{name}": shape for name, shape in shapes.items()}
    header = denoiser_pb2.DenoiseHeader(num_inference_steps=steps, guidance_scale=5.0, seed=seed, height=size,
                                        width=size)
    messages = [denoiser_pb2.DenoiseRequest(header=header)]
    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=g).to(dtype)
        messages += [denoiser_pb2.DenoiseRequest(chunks=[c]) for c in to_proto_chunks(name, tensor)]
    return messages


def denoise_all(stub, calls: list[list]) -> int:
    """The calls at once; how many returned their latents."""
    def one(messages: list) -> int:
        return int(any(r.HasField("chunk") for r in stub.Denoise(iter(messages), timeout=TIMEOUT_S)))

    return sum(run_all([lambda m=m: one(m) for m in calls]))


def serving_run(unet: torch.nn.Module, policy: str, requests: int, size: int, steps: int,
                max_batch_rows: int | None = None) -> ServingRun:
    """A denoiser server with `policy` over `unet`; two short calls at once to warm it (and let the engine
    calibrate), then `requests` calls at once, timed, with the device's peak memory over them."""
    config, dtype = unet.config, unet.dtype
    servicer = DenoiserServicer(unet, SDXL_SCHEDULER_CONFIG, policy=policy, max_batch_rows=max_batch_rows)
    server = make_server(servicer, "127.0.0.1:0")
    cuda = next(unet.parameters()).device.type == "cuda"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = denoiser_pb2_grpc.DenoiserStub(channel)
            denoise_all(stub, [denoise_messages(config, size, 2, seed, dtype) for seed in (0, 1)])
            calls = [denoise_messages(config, size, steps, seed, dtype) for seed in range(requests)]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            images = denoise_all(stub, calls)
            seconds = time.perf_counter() - began
        peak = torch.cuda.max_memory_allocated() if cuda else None
        curves = servicer.engine.budget.curves
        budget = "; ".join(f"latents {k[0]}x{k[1]}: {min(c, key=c.get)} rows, s/row "
                           f"{ {r: round(v, 4) for r, v in c.items()} }" for k, c in curves.items())
        return ServingRun(policy, seconds, images, peak, budget)
    finally:
        server.stop(5)


def gpu_section(args: argparse.Namespace) -> list[ServingRun] | None:
    if not torch.cuda.is_available():
        return None
    unet = random_unet(SDXL_BASE_UNET, "cuda", torch.float16)
    return [serving_run(unet, policy, args.gpu_requests, args.gpu_size, args.gpu_steps, args.max_batch_rows)
            for policy in ("fifo", "batch")]


def print_serving(runs: list[ServingRun] | None, args: argparse.Namespace, what: str) -> None:
    print(f"\n== d. {args.gpu_requests} Denoise calls at once, {args.gpu_size}x{args.gpu_size}, {args.gpu_steps} steps, "
          f"guided, {what}")
    if runs is None:
        print("skipped: no GPU")
        return
    for run in runs:
        peak = "-" if run.peak_bytes is None else f"{run.peak_bytes / 2**30:.2f} GiB"
        print(f"{run.policy:<6} {run.images} images in {run.seconds:.1f} s: {run.images_per_s:.3f} images/s, "
              f"peak memory {peak}" + (f"; budget {run.budget}" if run.budget else ""))
    fifo, batch = runs
    print(f"ratio batch / fifo: images/s {batch.images_per_s / fifo.images_per_s:.2f}")


# --- the run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma separated: {', '.join(SECTIONS)}")
    p.add_argument("--seconds", type=float, default=120.0,
                   help="a: the closed loop's length per policy (on 2 CPU cores a full request alone takes ~27 s: "
                        "120 s get several done under each policy; the whole default run takes ~20 minutes)")
    p.add_argument("--clients", type=int, default=8, help="a: clients, half preview, half full")
    p.add_argument("--preview-size", type=int, default=256)
    p.add_argument("--preview-steps", type=int, default=4)
    p.add_argument("--full-size", type=int, default=1024)
    p.add_argument("--full-steps", type=int, default=20)
    p.add_argument("--max-batch-rows", type=int, help="a, b, d: fix the engine's row budget (default: measured)")
    p.add_argument("--vae-tile", type=int, metavar="PIXELS",
                   help="a: also run the engine with the VAE's --vae-tile PIXELS (tiled decodes)")
    p.add_argument("--burst", type=int, default=32, help="b: previews sent at once")
    p.add_argument("--curve-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[256, 512, 1024],
                   help="c: image sides, comma separated")
    p.add_argument("--curve-rows", type=int, default=16, help="c: the most rows per forward (a power of two)")
    p.add_argument("--curve-budget", type=float, default=60.0, help="c: seconds one config and size may take")
    p.add_argument("--gpu-requests", type=int, default=8)
    p.add_argument("--gpu-size", type=int, default=1024)
    p.add_argument("--gpu-steps", type=int, default=30)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser().error(f"--only: unknown sections {sorted(only - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    preview = RequestClass("preview", args.preview_size, args.preview_steps, priority="interactive")
    full = RequestClass("full", args.full_size, args.full_steps, refiner="ensemble")
    kinds = [preview, full] * (args.clients // 2)
    if "traffic" in only or "burst" in only:
        if "traffic" not in only:
            args.seconds = 0
        runs = [traffic_run(config, kinds, args, preview if config is PIECES and "burst" in only else None)
                for config in (traffic_configs(args) if "traffic" in only else [PIECES])]
        if "traffic" in only:
            print_traffic(runs, args)
        if "burst" in only:
            print_burst(next(run for run in runs if run.burst is not None), preview)
    if "curve" in only:
        curve_section(args)
    if "gpu" in only:
        print_serving(gpu_section(args), args, "float16, full SDXL base UNet (random weights)")


if __name__ == "__main__":
    main()
