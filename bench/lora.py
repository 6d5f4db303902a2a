"""The cost of a LoRA adapter per denoising step: one UNet forward with no adapter, with an adapter unfused (the
stage engine's way: a hook per adapted layer adds its low-rank term), fused into the weights, and unfused on half
the rows (a forward shared by a request with the adapter and one without).

Run with `make bench` (or `python -m bench.lora [--rank 32] [--size 512] [--device cuda --dtype float16]`).
The adapter is kohya's default SDXL network: every linear layer of the transformer blocks (attention q/k/v/out,
feed-forward, proj_in/out). Runs alternate between the variants and the fastest of each is kept; ratios are
against the no-adapter time of the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.engine import MID_UNET, random_unet
from sdxl_core.configs import TINY_BASE_UNET
from sdxl_core.lora import applied, applied_rows, fuse, load_adapter, unfuse
from sdxl_core.lora.write import kohya_tensors, random_layers

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
CONFIGS = {"tiny": TINY_BASE_UNET, "mid": MID_UNET}


def unet_inputs(unet: torch.nn.Module, latent: int, rows: int) -> tuple:
    c, g, device = unet.config, torch.Generator().manual_seed(0), unet.device
    return tuple(t.to(device, unet.dtype) for t in (
        torch.randn(rows, c.in_channels, latent, latent, generator=g), torch.full((rows,), 500.0),
        torch.randn(rows, 77, c.cross_attention_dim, generator=g), torch.randn(rows, c.pooled_projection_dim, generator=g),
        torch.randn(rows, c.num_time_ids, generator=g)))


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


@torch.no_grad()
def measure(config_name: str, rank: int, size: int, rows: int, repeats: int, device: str, dtype: torch.dtype) -> dict:
    """Best seconds per forward of each variant, alternating between them `repeats` times after a warm-up."""
    unet = random_unet(CONFIGS[config_name], device, dtype)
    adapter = load_adapter("<bench>", {"unet": unet}, "bench",
                           tensors=kohya_tensors(random_layers({"unet": unet}, rank, seed=0, targets=TARGETS)))
    inputs = unet_inputs(unet, size // 8, rows)
    half = rows // 2

    variants = {
        "none": lambda: unet(*inputs),
        "unfused": lambda: _under(applied({adapter: 1.0}), lambda: unet(*inputs)),
        "unfused, half the rows": lambda: _under(applied_rows([({adapter: 1.0}, half), (None, rows - half)]),
                                                 lambda: unet(*inputs)),
    }
    best = {name: float("inf") for name in [*variants, "fused"]}
    for name, fn in variants.items():
        fn()  # warm-up
    fuse({adapter: 1.0})
    unet(*inputs)
    unfuse({adapter: 1.0})
    for _ in range(repeats):
        for name, fn in variants.items():
            best[name] = min(best[name], timed(fn, unet.device))
        fuse({adapter: 1.0})  # the merge itself is a one-off, not a step's cost
        best["fused"] = min(best["fused"], timed(lambda: unet(*inputs), unet.device))
        unfuse({adapter: 1.0})
    return {"adapter_mib": adapter.nbytes / 2**20, "layers": len(adapter.layers["unet"]), **best}


def _under(context, fn):
    with context:
        return fn()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=CONFIGS, default="mid")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--size", type=int, default=512, help="image pixels per side (latents: size / 8)")
    p.add_argument("--rows", type=int, default=2, help="rows per forward (2: one image with guidance)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args(argv)
    result = measure(args.config, args.rank, args.size, args.rows, args.repeats, args.device,
                     getattr(torch, args.dtype))
    print(f"UNet forward per denoising step, {args.config} config, {args.size}x{args.size} px, {args.rows} rows, "
          f"{args.device} {args.dtype}, {torch.get_num_threads()} threads; rank-{args.rank} adapter on "
          f"{result['layers']} layers ({result['adapter_mib']:.1f} MiB); best of {args.repeats}")
    base = result["none"]
    for name in ("none", "unfused", "unfused, half the rows", "fused"):
        print(f"  {name:<24} {result[name] * 1000:9.1f} ms  {result[name] / base:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
