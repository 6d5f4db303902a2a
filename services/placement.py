"""Where `sdxl serve --all` runs each stage: devices (one process per device listed) and dtypes.

The default spreads the stages over the visible GPUs by their cost (deploy/README.md "Placement on one
host", numbers from `python -m deploy.sizing`): a base and a refiner denoising step cost the same (~12 TFLOP
at 1024x1024 with CFG), the base runs 0.8 of an ensemble's steps, and the refiner's GPUs also run the light
stages (the text encoders, and the VAE decode of about two steps' time in float32).

On the CPU, where every process would otherwise take every core for torch's threads, the cores are split
between the stage processes by their compute per image (split_threads).
"""

from __future__ import annotations

import math
import os
import re

STAGES = ("text_encoder", "base", "refiner", "vae")
_DEVICE = re.compile(r"[a-z]+(:\d+)?")
Placement = dict[str, tuple[str, ...]]  # stage -> devices, one stage process per device


def visible_gpus() -> int:
    """torch.cuda.device_count(); 0 without torch (the client alone) or without CUDA."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def check_device(device: str, what: str) -> str:
    """`device` if it reads as a torch device (cpu, cuda, cuda:N, ...); ValueError naming `what` otherwise."""
    if not _DEVICE.fullmatch(device):
        raise ValueError(f"{what}: {device!r} is not a device; expected cpu, cuda or cuda:N")
    return device


def check_visible(device: str, gpus: int, what: str) -> None:
    """ValueError if `device` is a GPU beyond the `gpus` torch sees."""
    kind, _, index = device.partition(":")
    if kind == "cuda" and int(index or 0) >= gpus:
        visible = f"cuda:0 to cuda:{gpus - 1}" if gpus else "none"
        raise ValueError(f"{what} is {device}, but torch sees {gpus} GPU(s) ({visible}; "
                         "CUDA_VISIBLE_DEVICES limits them)")


def parse_devices(text: str, what: str) -> tuple[str, ...]:
    """"cuda:0+cuda:1" -> ("cuda:0", "cuda:1"): several devices start one replica on each."""
    return tuple(check_device(device.strip(), what) for device in text.split("+"))


def parse_placement(text: str) -> Placement:
    """"base=cuda:0+cuda:1,refiner=cuda:2,text_encoder=cuda:2,vae=cuda:2" -> {stage: devices}."""
    placement = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        stage, sep, devices = entry.partition("=")
        stage = stage.strip().replace("-", "_")
        if not sep or stage not in STAGES:
            raise ValueError(f"--placement: {entry!r} is not STAGE=DEVICE[+DEVICE...] with STAGE one of "
                             f"{', '.join(STAGES)}")
        if stage in placement:
            raise ValueError(f"--placement names {stage} twice")
        placement[stage] = parse_devices(devices, f"--placement {stage}")
    return placement


# Shares of one ensemble image's GPU time: the base's steps, and the refiner's steps plus decode and prompts.
BASE_SHARE, REFINER_SIDE_SHARE = 0.8, 0.24


def refiner_gpus(gpus: int) -> int:
    """How many of `gpus` (>= 2) GPUs run a refiner so that ensemble images per second are highest: the
    slower side sets the rate; on a tie the base gets the GPU (it also serves requests without a refiner)."""
    def rate(refiners: int) -> float:
        return min((gpus - refiners) / BASE_SHARE, refiners / REFINER_SIDE_SHARE)

    return max(range(1, gpus), key=lambda refiners: (rate(refiners), -refiners))


def default_placement(gpus: int, refiner: bool = True) -> Placement:
    """The stages over `gpus` GPUs, one UNet per GPU: none -> all on cpu; one -> all on cuda:0; more -> the
    last `refiner_gpus` GPUs run a refiner each, the text encoder (first of them) and the VAE (last of them),
    every other GPU a base replica (2: 1 + 1, 4: 3 + 1, 8: 6 + 2). Without a refiner every GPU runs a base."""
    if gpus <= 0:
        return {stage: ("cpu",) for stage in STAGES}
    devices = tuple(f"cuda:{i}" for i in range(gpus))
    if gpus == 1:
        return {stage: devices for stage in STAGES}
    if not refiner:
        return {"text_encoder": devices[-1:], "base": devices, "refiner": (), "vae": devices[-1:]}
    split = gpus - refiner_gpus(gpus)
    base, rest = devices[:split], devices[split:]
    return {"text_encoder": rest[:1], "base": base, "refiner": rest, "vae": rest[-1:]}


def default_dtype(stage: str, device: str) -> str:
    """float32 on the CPU; on an accelerator float16, except the VAE: SDXL's VAE overflows in float16, and a
    half VAE with `force_upcast` decodes in a float32 copy of itself, which peaks higher than a float32 VAE."""
    return "float32" if device == "cpu" or stage == "vae" else "float16"


# Each stage's part of one ensemble image's compute, for splitting CPU cores (deploy/README.md "Sizing"): base
# and refiner steps cost the same (~12 TFLOP), the base runs BASE_SHARE of them; a VAE decode (~10 TFLOP) is
# about one step of fifty; the text encoders (0.4 TFLOP) next to nothing.
CPU_WEIGHTS = {"text_encoder": 0.0, "base": BASE_SHARE, "refiner": 1 - BASE_SHARE, "vae": 0.02}


def host_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset and cpusets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_threads(text: str) -> dict[str, int]:
    """"base=12,refiner=3" -> {stage: torch threads of each of its processes}."""
    threads = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        stage, _, count = entry.partition("=")
        stage = stage.strip().replace("-", "_")
        if stage not in STAGES or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"--threads: {entry!r} is not STAGE=N with STAGE one of {', '.join(STAGES)} and N >= 1")
        if stage in threads:
            raise ValueError(f"--threads names {stage} twice")
        threads[stage] = int(count)
    return threads


def split_threads(cores: int, processes: dict[str, tuple[str, str]], fixed: dict[str, int] | None = None
                  ) -> dict[str, int]:
    """Torch threads per process ({name: (stage, device)}) on a host of `cores` CPUs.

    A stage in `fixed` gets its count in each of its processes; a GPU-placed process 1 (it launches kernels).
    The CPU-placed processes left share the cores those leave: 1 each, then the rest in proportion to
    CPU_WEIGHTS (a stage's weight split equally between its replicas), so that no stage is the pipeline's
    bottleneck by much; with the base and refiner both on the CPU, 16 cores give text encoder 1, base 11,
    refiner 3, VAE 1. With fewer cores than processes each still gets 1.
    """
    fixed = fixed or {}
    threads = {name: fixed.get(stage, 1) for name, (stage, device) in processes.items()
               if stage in fixed or device != "cpu"}
    shared = {name: stage for name, (stage, _) in processes.items() if name not in threads}
    if not shared:
        return threads
    replicas = {stage: list(shared.values()).count(stage) for stage in set(shared.values())}
    weights = {name: CPU_WEIGHTS[stage] / replicas[stage] for name, stage in shared.items()}
    if not any(weights.values()):  # only weightless stages on the CPU: they share it equally
        weights = dict.fromkeys(shared, 1.0)
    spare = max(cores - sum(threads.values()) - len(shared), 0)
    extra = apportion(spare, weights)
    return {**threads, **{name: 1 + extra[name] for name in shared}}


def apportion(total: int, weights: dict[str, float]) -> dict[str, int]:
    """`total` in whole parts proportional to `weights` (largest remainder: they sum to `total`)."""
    exact = {name: total * weight / sum(weights.values()) for name, weight in weights.items()}
    parts = {name: math.floor(share) for name, share in exact.items()}
    leftover = total - sum(parts.values())
    for name in sorted(exact, key=lambda n: (exact[n] - parts[n], weights[n]), reverse=True)[:leftover]:
        parts[name] += 1
    return parts
