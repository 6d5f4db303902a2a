"""`sdxl serve --all`: start the processes of every stage on one host (one per stage and device, then the
orchestrator), watch them, and stop them. The client's `sdxl` command hands `serve` over to `main` here."""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdxl_wire import FLOAT_DTYPES

from .engine import POLICIES
from .placement import (
    STAGES,
    check_device,
    check_visible,
    default_dtype,
    default_placement,
    host_cores,
    parse_devices,
    parse_placement,
    parse_threads,
    split_threads,
    visible_gpus,
)

_LISTENING = re.compile(r"listening on")
_TAIL_LINES = 40


class LaunchError(RuntimeError):
    """A stage process failed to start or become SERVING."""


class Aborted(RuntimeError):
    """Startup was interrupted by a stop signal."""


@dataclass(frozen=True)
class StageProcess:
    """One stage process: several of one stage are replicas the orchestrator spreads calls over."""

    name: str  # the stage, or "base-0", "base-1", ... for replicas
    stage: str
    device: str
    dtype: str
    threads: int | None = None  # torch's CPU threads; None: torch's default (OMP_NUM_THREADS, else every core)


@dataclass(frozen=True)
class ServeOptions:
    """`sdxl serve --all`'s options. No model path: the services' default (the tiny model).

    A stage's devices: its own `{stage}_device`, else its `placement` entry, else `device`, else the default
    placement over the visible GPUs (placement.default_placement). Several devices ("cuda:0+cuda:1") start a
    replica on each. Its dtype: `{stage}_dtype`, else `dtype`, else placement.default_dtype. Its torch threads:
    its `threads` entry, else a share of the host's cores (placement.split_threads), unless OMP_NUM_THREADS is
    set: then every process not named in `threads` keeps what the variable gives it.
    """

    base_model: str | None = None
    refiner_model: str | None = None
    no_refiner: bool = False
    host: str = "127.0.0.1"  # loopback only unless asked: "[::]" for every interface
    port: int = 50051  # the orchestrator's; 0 picks a free one
    device: str | None = None  # every stage's, unless placed otherwise
    placement: str | None = None  # "base=cuda:0+cuda:1,refiner=cuda:2,text_encoder=cuda:2,vae=cuda:2"
    text_encoder_device: str | None = None
    base_device: str | None = None
    refiner_device: str | None = None
    vae_device: str | None = None
    dtype: str | None = None  # every stage's, unless its own is given
    text_encoder_dtype: str | None = None
    base_dtype: str | None = None
    refiner_dtype: str | None = None
    vae_dtype: str | None = None
    threads: str | None = None  # "base=12,refiner=3": torch threads per process of those stages
    policy: str | None = None  # every stage's engine policy (stage.py --policy); None: theirs
    max_batch_rows: int | None = None  # the base's and refiner's row budget; None: measured
    vae_tile: int | None = None  # the VAE's --vae-tile; None: its default (whole images, layer by layer)
    vae_whole_pixels: int | None = None  # the VAE's --vae-whole-pixels; None: its default
    lora_dir: str | None = None  # the text encoder's, base's and refiner's --lora-dir
    lora_cache: int | None = None  # ... and --lora-cache; None: theirs
    start_timeout_s: float = 600.0  # loading full-size weights from a cold disk takes minutes
    grace_s: float = 30.0  # the stages drain for up to 25 s on SIGTERM
    auth_token_file: str | None = None  # every process's --auth-token-file: one token for clients and stages

    def __post_init__(self):
        if self.base_model and not self.refiner_model and not self.no_refiner:
            raise ValueError("--base-model needs --refiner-model too (or --no-refiner): the tiny refiner "
                             "would not match a real base model")
        if self.device:
            check_device(self.device, "--device")
        parse_placement(self.placement or "")
        for stage in STAGES:
            if own := getattr(self, f"{stage}_device"):
                parse_devices(own, f"--{_flag(stage)}-device")
        parse_threads(self.threads or "")
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.max_batch_rows is not None and self.max_batch_rows < 1:
            raise ValueError(f"--max-batch-rows must be >= 1, got {self.max_batch_rows}")
        for flag, value in (("--vae-tile", self.vae_tile), ("--vae-whole-pixels", self.vae_whole_pixels),
                            ("--lora-cache", self.lora_cache)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")

    def devices(self, stage: str, gpus: int) -> tuple[str, ...]:
        """The devices of `stage`'s processes on a host with `gpus` visible GPUs."""
        if own := getattr(self, f"{stage}_device"):
            return parse_devices(own, f"--{_flag(stage)}-device")
        if placed := parse_placement(self.placement or "").get(stage):
            return placed
        if self.device:
            return (self.device,)
        return default_placement(gpus, refiner=not self.no_refiner)[stage]

    def processes(self, gpus: int, cores: int | None = None) -> list[StageProcess]:
        """Every stage process, in start order, on a host with `gpus` GPUs and `cores` CPUs (None: this
        process's); ValueError if base replicas would differ in dtype."""
        processes = []
        for stage in STAGES:
            if stage == "refiner" and self.no_refiner:
                continue
            devices = self.devices(stage, gpus)
            for i, device in enumerate(devices):
                check_visible(device, gpus, f"{stage}'s device")
                dtype = getattr(self, f"{stage}_dtype") or self.dtype or default_dtype(stage, device)
                processes.append(StageProcess(stage if len(devices) == 1 else f"{stage}-{i}", stage, device, dtype))
        base_dtypes = sorted({p.dtype for p in processes if p.stage == "base"})
        if len(base_dtypes) > 1:  # Vae.Encode computes in the base's dtype: replicas must agree on it
            raise ValueError(f"the base replicas would run in {' and '.join(base_dtypes)} (cpu and GPU defaults); "
                             "give them one dtype with --base-dtype")
        return self._with_threads(processes, host_cores() if cores is None else cores)

    def _with_threads(self, processes: list[StageProcess], cores: int) -> list[StageProcess]:
        fixed = parse_threads(self.threads or "")
        threads = split_threads(cores, {p.name: (p.stage, p.device) for p in processes}, fixed)
        inherit = "OMP_NUM_THREADS" in os.environ  # the user's choice for every process, as torch reads it
        return [replace(p, threads=None if inherit and p.stage not in fixed else threads[p.name])
                for p in processes]

    def stage_args(self, process: StageProcess) -> list[str]:
        """The model, device, dtype, threads and engine arguments (base, refiner: row budget; VAE: tiles) of one
        stage process."""
        model = self.refiner_model if process.stage == "refiner" else self.base_model
        args = ["--model", model] if model else []
        if process.stage == "text_encoder" and self.refiner_model and not self.no_refiner:
            args += ["--refiner-model", self.refiner_model]  # the refiner's own text encoder
        args += ["--device", process.device, "--dtype", process.dtype]
        if process.threads is not None:
            args += ["--threads", str(process.threads)]
        args += ["--policy", self.policy] if self.policy else []
        if process.stage in ("base", "refiner"):
            args += ["--max-batch-rows", str(self.max_batch_rows)] if self.max_batch_rows else []
        if process.stage in ("text_encoder", "base", "refiner"):
            args += ["--lora-dir", self.lora_dir] if self.lora_dir else []
            args += ["--lora-cache", str(self.lora_cache)] if self.lora_cache else []
        if process.stage == "vae":
            args += ["--vae-tile", str(self.vae_tile)] if self.vae_tile else []
            args += ["--vae-whole-pixels", str(self.vae_whole_pixels)] if self.vae_whole_pixels else []
        return args + self._auth_args()

    def orchestrator_args(self, processes: list[StageProcess], addresses: dict[str, str]) -> list[str]:
        """Each stage's addresses, replicas as one list; the orchestrator asks the stages the rest (Describe)."""
        args = []
        for stage in STAGES:
            if listed := [addresses[p.name] for p in processes if p.stage == stage]:
                args += [f"--{_flag(stage)}", ",".join(listed)]
        return args + self._auth_args()

    def _auth_args(self) -> list[str]:
        return ["--auth-token-file", self.auth_token_file] if self.auth_token_file else []


def _flag(stage: str) -> str:
    return stage.replace("_", "-")


def free_port() -> int:
    """A TCP port free on localhost now (another process may take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_PRCTL = _libc_prctl()  # looked up here: the child may only call it between fork and exec


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphaned stages if the launcher is killed


@dataclass
class Child:
    """One stage process, its merged stdout/stderr tail, and whether it said it is listening."""

    name: str
    address: str  # where clients reach it
    process: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_TAIL_LINES))
    listening: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None
    stage: str = ""  # what spawn() ran, to run it again
    args: tuple[str, ...] = ()

    def describe_failure(self, what: str) -> str:
        """An error message with the process's exit status and its last output lines."""
        code = self.process.poll()
        if code is not None and self.reader is not None:
            self.reader.join(2.0)  # its last lines may still be in the pipe
        status = "still running" if code is None else f"exit status {code}"
        lines = "".join(f"    {line}" for line in self.tail) or "    (no output)\n"
        return f"{self.name} {what} ({status}); its last output:\n{lines}"


def spawn(stage: str, args: list[str], address: str, echo: TextIO | None = None, name: str | None = None) -> Child:
    """Start `python -m sdxl_services STAGE ARGS` with stdout and stderr merged into one watched pipe."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    name = name or stage
    process = subprocess.Popen(
        [sys.executable, "-m", "sdxl_services", stage, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, bufsize=1, env=env, preexec_fn=_die_with_parent,  # noqa: PLW1509 - calls only a looked-up function
    )
    child = Child(name, address, process, stage=stage, args=tuple(args))
    child.reader = threading.Thread(target=_pump, args=(child, echo), name=f"sdxl-{name}-output", daemon=True)
    child.reader.start()
    return child


def _pump(child: Child, echo: TextIO | None) -> None:
    for line in child.process.stdout:
        child.tail.append(line)
        if _LISTENING.search(line):
            child.listening.set()
        if echo is not None:
            echo.write(f"[{child.name}] {line}")
            echo.flush()


def _serving(address: str, timeout: float) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def wait_ready(child: Child, deadline: float, abort: threading.Event | None = None) -> None:
    """Wait for the "listening" line, then for health SERVING; LaunchError if it exits or time runs out."""
    abort = abort or threading.Event()

    def serving() -> bool:
        if _serving(child.address, timeout=1.0):
            return True
        time.sleep(0.2)
        return False

    _wait(child, deadline, abort, lambda: child.listening.wait(0.2), "listening", "printed no 'listening on' line")
    _wait(child, deadline, abort, serving, "SERVING", "did not report SERVING")


def _wait(child: Child, deadline: float, abort: threading.Event, ready: Callable[[], bool], state: str,
          late: str) -> None:
    """Poll `ready` until true; Aborted on `abort`, LaunchError if the child exits or the deadline passes."""
    while not ready():
        if abort.is_set():
            raise Aborted(f"stopped while waiting for {child.name}")
        if child.process.poll() is not None:
            raise LaunchError(child.describe_failure(f"exited before {state}"))
        if time.monotonic() > deadline:
            raise LaunchError(child.describe_failure(f"{late} in time"))


def stop(children: list[Child], grace_s: float = 30.0) -> dict[str, int]:
    """SIGTERM each child (the orchestrator first, so it drains while the stages still serve), kill after grace."""
    orchestrator = [c for c in children if c.name == "orchestrator"]
    for group in (orchestrator, [c for c in children if c.name != "orchestrator"]):
        for child in group:
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + grace_s
        for child in group:
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
    return {c.name: c.process.returncode for c in children}


class Cluster:
    """The stage processes and the orchestrator of one host: `with Cluster(options) as cluster: cluster.address`.

    `gpus`: the visible GPUs the default placement spreads over; None asks torch.
    """

    def __init__(self, options: ServeOptions = ServeOptions(), echo: TextIO | None = None, gpus: int | None = None):
        self.options = options
        self.echo = echo
        self.processes = options.processes(visible_gpus() if gpus is None else gpus)
        self.children: list[Child] = []
        self.port = options.port or free_port()
        host = "localhost" if options.host in ("[::]", "0.0.0.0", "") else options.host
        self.address = f"{host}:{self.port}"  # where a client on this host reaches the orchestrator

    def start(self, abort: threading.Event | None = None) -> None:
        """Start every process and wait until each is SERVING; on failure stop them all and raise LaunchError."""
        addresses = {p.name: f"127.0.0.1:{free_port()}" for p in self.processes}
        try:
            for process in self.processes:
                args = [*self.options.stage_args(process), "--address", addresses[process.name]]
                self.children.append(spawn(process.stage, args, addresses[process.name], self.echo, process.name))
            deadline = time.monotonic() + self.options.start_timeout_s
            for child in self.children:
                wait_ready(child, deadline, abort)
            # Last, so its first connections find the stages up instead of backing off from refusals.
            bind = f"{self.options.host}:{self.port}"
            args = [*self.options.orchestrator_args(self.processes, addresses), "--address", bind]
            self.children.append(spawn("orchestrator", args, self.address, self.echo))
            wait_ready(self.children[-1], deadline, abort)
        except BaseException:
            self.stop()
            raise

    def placed(self) -> dict[str, str]:
        """"device dtype [threads=N]" of each stage process, by name."""
        return {p.name: f"{p.device} {p.dtype}" + (f" threads={p.threads}" if p.threads else "")
                for p in self.processes}

    def endpoints(self) -> dict[str, str]:
        """Each process's address, by process name."""
        return {c.name: c.address for c in self.children}

    def failed(self) -> Child | None:
        """A child that has exited, if any."""
        return next((c for c in self.children if c.process.poll() is not None), None)

    def respawn(self, child: Child) -> Child:
        """Start `child`'s process again, on its address, in its place; call from the thread that started it."""
        new = spawn(child.stage, list(child.args), child.address, self.echo, child.name)
        self.children[self.children.index(child)] = new
        return new

    def stop(self) -> dict[str, int]:
        """Stop every process; returns their exit codes by name."""
        return stop(self.children, self.options.grace_s)

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class Supervision:
    """How `sdxl serve --all` restarts a process that dies: on its address (the orchestrator's list of replicas
    stays right), after a backoff that doubles with each of its deaths within `window_s`. At `max_deaths` deaths
    of one process within `window_s` (one that fails at start gets there in under a minute) it gives up."""

    backoff_s: float = 1.0
    max_backoff_s: float = 16.0
    max_deaths: int = 5
    window_s: float = 120.0


class Supervisor:
    """Restarts the cluster's processes that die. Call check() from the thread that started them: a child is
    sent SIGTERM when the thread that spawned it ends (PR_SET_PDEATHSIG)."""

    def __init__(self, cluster: Cluster, policy: Supervision, stopping: threading.Event, log: TextIO):
        self.cluster, self.policy, self.stopping, self.log = cluster, policy, stopping, log
        self.deaths: dict[str, list[float]] = collections.defaultdict(list)
        self.due: dict[str, tuple[float, float]] = {}  # name -> (when it died, when to restart it)

    def check(self) -> Child | None:
        """Restart the processes whose backoff is over, schedule those that died; return one that died too
        often, if any."""
        now = time.monotonic()
        for child in list(self.cluster.children):
            if child.name in self.due:
                died, restart_at = self.due[child.name]
                if now >= restart_at:
                    del self.due[child.name]
                    self._write(f"restarting {child.name} on {child.address}")
                    new = self.cluster.respawn(child)
                    threading.Thread(target=self._report, args=(new, died), daemon=True,
                                     name=f"sdxl-{child.name}-restart").start()
            elif child.process.poll() is not None:
                deaths = [t for t in self.deaths[child.name] if now - t < self.policy.window_s] + [now]
                self.deaths[child.name] = deaths
                if len(deaths) >= self.policy.max_deaths:
                    return child
                delay = min(self.policy.backoff_s * 2 ** (len(deaths) - 1), self.policy.max_backoff_s)
                self.due[child.name] = (now, now + delay)
                self._write(child.describe_failure("stopped unexpectedly") + f"restarting it in {delay:.1f} s "
                            f"({len(deaths)} of {self.policy.max_deaths} deaths allowed in {self.policy.window_s:.0f} s)")
        return None

    def _report(self, child: Child, died: float) -> None:
        try:
            wait_ready(child, time.monotonic() + self.cluster.options.start_timeout_s, self.stopping)
        except (LaunchError, Aborted):
            return  # check() sees it exit
        self._write(f"{child.name} is SERVING again, {time.monotonic() - died:.1f} s after it stopped")

    def _write(self, line: str) -> None:
        self.log.write(f"sdxl serve --all: {line.rstrip()}\n")
        self.log.flush()


def serve_all(options: ServeOptions, out: TextIO = sys.stdout, echo: TextIO | None = sys.stderr,
              supervision: Supervision = Supervision()) -> int:
    """Run `sdxl serve --all` until SIGINT / SIGTERM, restarting processes that die (Supervision); returns the exit
    status: 1 if one kept dying."""
    try:
        cluster = Cluster(options, echo)
    except ValueError as e:  # a placement the orchestrator cannot serve
        sys.stderr.write(f"sdxl serve --all: {e}\n")
        return 2
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    placed = cluster.placed()
    try:
        cluster.start(stopping)
        out.writelines(f"{name:<14} {address:<21} {placed.get(name, '')}".rstrip() + "\n"
                       for name, address in cluster.endpoints().items())
        out.write(f"serving on {cluster.address}\n")
        out.flush()
        supervisor = Supervisor(cluster, supervision, stopping, sys.stderr)
        while not stopping.wait(0.5):
            if (dead := supervisor.check()) is not None:
                sys.stderr.write(dead.describe_failure(f"stopped {supervision.max_deaths} times in "
                                                       f"{supervision.window_s:.0f} s") + "stopping the others\n")
                return 1
        return 0
    except LaunchError as e:
        sys.stderr.write(f"sdxl serve --all: {e}")
        return 1
    except Aborted:
        return 0
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdxl serve", description="Serve every stage and the orchestrator on this host.")
    p.add_argument("--all", action="store_true", required=True, help="start every stage and the orchestrator")
    p.add_argument("--base-model", help="the base model (folder or file); default: the tiny model")
    p.add_argument("--refiner-model", help="the refiner model; default: the tiny model")
    p.add_argument("--no-refiner", action="store_true", help="start no refiner stage")
    p.add_argument("--host", default="127.0.0.1",
                   help="the orchestrator's listening host (default: loopback only; [::] for every interface)")
    p.add_argument("--auth-token-file", metavar="PATH",
                   help="require 'authorization: Bearer TOKEN' (this file's content) on every process's calls but "
                        "health; the orchestrator sends it to the stages")
    p.add_argument("--port", type=int, default=50051, help="the orchestrator's port; 0 picks a free one")
    p.add_argument("--device", help="every stage's device, unless placed otherwise; default: spread over the "
                                    "visible GPUs (deploy/README.md), cpu without one")
    p.add_argument("--placement", metavar="STAGE=DEV[+DEV...],...",
                   help="devices per stage, one process per device, e.g. "
                        "'base=cuda:0+cuda:1+cuda:2,refiner=cuda:3,text_encoder=cuda:3,vae=cuda:3'")
    for stage in STAGES:
        p.add_argument(f"--{_flag(stage)}-device", metavar="DEV[+DEV...]",
                       help=f"the {stage} stage's device(s), e.g. cuda:0 (overrides --placement)")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, help="every stage's dtype, unless its own is given; default: "
                                                         "float32 on cpu, float16 on a GPU (the VAE float32)")
    for stage in STAGES:
        p.add_argument(f"--{_flag(stage)}-dtype", choices=FLOAT_DTYPES, help=f"the {stage} stage's dtype")
    p.add_argument("--threads", metavar="STAGE=N,...",
                   help="torch's CPU threads in each process of those stages, e.g. 'base=12,vae=2'; default: the "
                        "host's cores split by each stage's compute, 1 per GPU-placed process "
                        "(services/placement.py split_threads); with OMP_NUM_THREADS set, that for the rest")
    p.add_argument("--policy", choices=POLICIES, help="every stage's engine policy (default: batch)")
    p.add_argument("--max-batch-rows", type=int, metavar="N",
                   help="the base's and refiner's rows per UNet forward; default: measured on the device")
    p.add_argument("--vae-tile", type=int, metavar="PIXELS",
                   help="the VAE decodes images larger than this a tile at a time (a multiple of 32, at least 64); "
                        "default: whole images, layer by layer")
    p.add_argument("--vae-whole-pixels", type=int, metavar="PIXELS",
                   help="the VAE decodes images of up to this many pixels whole (default 512 x 512), larger ones a "
                        "piece at a time, smaller decodes taking turns between the pieces")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="LoRA adapters (.safetensors, kohya or diffusers format) the text encoder, base and refiner "
                        "serve by file stem")
    p.add_argument("--lora-cache", type=int, metavar="N", help="adapters kept loaded per model (default 8)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds for every stage to be SERVING")
    return p


def serve_options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        base_model=args.base_model, refiner_model=args.refiner_model, no_refiner=args.no_refiner,
        host=args.host, port=args.port, device=args.device, placement=args.placement, dtype=args.dtype,
        threads=args.threads, policy=args.policy, max_batch_rows=args.max_batch_rows,
        vae_tile=args.vae_tile, vae_whole_pixels=args.vae_whole_pixels, lora_dir=args.lora_dir,
        lora_cache=args.lora_cache, start_timeout_s=args.start_timeout, auth_token_file=args.auth_token_file,
        **{f"{s}_{kind}": getattr(args, f"{s}_{kind}") for s in STAGES for kind in ("device", "dtype")},
    )


def main(argv: list[str]) -> int:
    """`sdxl serve --all [options]` (argv without "serve"): run the processes until a stop signal."""
    try:
        options = serve_options(parser().parse_args(argv))
    except ValueError as e:
        print(f"sdxl serve --all: {e}", file=sys.stderr)
        return 2
    return serve_all(options)
