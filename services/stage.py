"""One stage process: `python -m sdxl_services STAGE [options]` builds the stage's server and serves until SIGTERM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import logs
from .server import Server, ServerOptions

STAGES = ("text_encoder", "base", "refiner", "vae", "orchestrator")
DTYPES = ("float32", "float16", "bfloat16")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sdxl_services", description="Run one SDXL stage server.")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--model", help="diffusers folder or single file; default: the tiny model")
    parser.add_argument("--refiner-model", help="text_encoder: the refiner's model, for its bigG")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--address", default="[::]:50051", help="HOST:PORT to listen on (port 0: any free port)")
    parser.add_argument("--max-concurrency", type=int, help="requests running at once (default: 1, orchestrator 64)")
    parser.add_argument("--max-queue", type=int, help="requests waiting beyond those (default: 4, orchestrator 64)")
    parser.add_argument("--grace", type=float, help="seconds running requests get to finish after SIGTERM")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    for stage in ("text-encoder", "base", "refiner", "vae"):
        parser.add_argument(f"--{stage}", help=f"orchestrator: the {stage} stage, 'h1:p1,h2:p2' or 'dns:///name:port'")
    parser.add_argument("--base-dtype", default="float32", choices=DTYPES,
                        help="orchestrator: the base stage's --dtype, which Vae.Encode computes in")
    parser.add_argument("--base-inpainting", action="store_true",
                        help="orchestrator: the base stage serves a 9-channel inpainting UNet")
    return parser.parse_args(argv)


def server_options(args: argparse.Namespace) -> ServerOptions:
    """The stage's defaults with the given flags applied."""
    if args.stage == "orchestrator":
        from .orchestrator import OPTIONS as defaults
    else:
        defaults = ServerOptions()
    given = {"max_concurrency": args.max_concurrency, "max_queue": args.max_queue, "grace_s": args.grace,
             "metrics_port": args.metrics_port}
    fields = {k: v for k, v in given.items() if v is not None}
    return ServerOptions(**{**vars(defaults), **fields})


def _tiny(name: str) -> Path:
    from sdxl_core.tiny import ensure_tiny_model

    return ensure_tiny_model() / name


def build(args: argparse.Namespace) -> Server:
    """The stage's started, SERVING server; a missing --model means the tiny default model."""
    options = server_options(args)
    common = dict(device=args.device, dtype=args.dtype, address=args.address, options=options)
    if args.stage == "orchestrator":
        from .orchestrator import BaseModel
        from .orchestrator import build as build_orchestrator

        missing = [f"--{s}" for s in ("text_encoder", "base", "vae") if not getattr(args, s)]
        if missing:
            raise SystemExit(f"orchestrator needs {', '.join(m.replace('_', '-') for m in missing)}")
        base_model = BaseModel(args.base_dtype, args.base_inpainting)
        return build_orchestrator(args.text_encoder, args.base, args.refiner, args.vae, args.address, options,
                                  base_model=base_model)
    if args.stage == "text_encoder":
        from .text_encoder import build as build_text_encoder

        model = args.model or _tiny("base")
        refiner = args.refiner_model or (None if args.model else _tiny("refiner"))
        return build_text_encoder(model, refiner, **common)
    if args.stage == "vae":
        from .vae import build as build_vae

        return build_vae(args.model or _tiny("base"), **common)
    from .denoiser import build as build_denoiser

    return build_denoiser(args.model or _tiny(args.stage), **common)


def main(argv: list[str] | None = None) -> int:
    """Configure logging, build the stage, print its "listening" line, serve until SIGTERM."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure()
    server = build(args)
    host = args.address.rsplit(":", 1)[0]
    print(f"{args.stage} listening on {host}:{server.port}", flush=True)
    server.run_until_signal()
    return 0
