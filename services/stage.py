"""One stage process: `python -m sdxl_services STAGE [options]` builds the stage's server and serves until SIGTERM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdxl_core.loading.hub import is_hub_id

from . import allocator, logs, metrics
from .server import Server, ServerOptions
from .tls import ChannelTls, ServerTls

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
    tls = parser.add_argument_group("TLS", "PEM files; without --tls-cert the server listens in plaintext")
    tls.add_argument("--tls-cert", help="this server's certificate chain")
    tls.add_argument("--tls-key", help="this server's private key")
    tls.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mTLS)")
    tls.add_argument("--health-port", type=int,
                     help="also serve plaintext grpc.health.v1 (only) on this port, for probes that cannot do TLS")
    tls.add_argument("--stage-tls-ca", help="orchestrator: call the stages over TLS, trusting this CA")
    tls.add_argument("--stage-tls-cert", help="orchestrator: its client certificate for the stages (mTLS)")
    tls.add_argument("--stage-tls-key", help="orchestrator: the key of --stage-tls-cert")
    tls.add_argument("--stage-tls-server-name",
                     help="orchestrator: the name the stages' certificates carry, if not the target's host name")
    for stage in ("text-encoder", "base", "refiner", "vae"):
        parser.add_argument(f"--{stage}", help=f"orchestrator: the {stage} stage, 'h1:p1,h2:p2' or 'dns:///name:port'")
    parser.add_argument("--base-dtype", default="float32", choices=DTYPES,
                        help="orchestrator: the base stage's --dtype, which Vae.Encode computes in")
    parser.add_argument("--base-inpainting", action="store_true",
                        help="orchestrator: the base stage serves a 9-channel inpainting UNet")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if (args.stage_tls_cert is None) != (args.stage_tls_key is None):
        parser.error("--stage-tls-cert and --stage-tls-key go together")
    if (args.stage_tls_cert or args.stage_tls_server_name) and not args.stage_tls_ca:
        parser.error("--stage-tls-cert and --stage-tls-server-name need --stage-tls-ca")
    return args


def server_options(args: argparse.Namespace) -> ServerOptions:
    """The stage's defaults with the given flags applied."""
    if args.stage == "orchestrator":
        from .orchestrator import OPTIONS as defaults
    else:
        defaults = ServerOptions()
    tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    given = {"max_concurrency": args.max_concurrency, "max_queue": args.max_queue, "grace_s": args.grace,
             "metrics_port": args.metrics_port, "tls": tls, "health_port": args.health_port}
    fields = {k: v for k, v in given.items() if v is not None}
    return ServerOptions(**{**vars(defaults), **fields})


def _tiny(name: str) -> Path:
    from sdxl_core.tiny import ensure_tiny_model

    return ensure_tiny_model() / name


def stage_tls(args: argparse.Namespace) -> ChannelTls | None:
    """The orchestrator's TLS toward its stages, if asked for."""
    if not args.stage_tls_ca:
        return None
    return ChannelTls(args.stage_tls_ca, args.stage_tls_cert, args.stage_tls_key, args.stage_tls_server_name)


def check_models(args: argparse.Namespace) -> None:
    """Fail before listening when a model path is absent (an unfilled volume, a typo), naming the flag."""
    for flag in ("model", "refiner_model"):
        path = getattr(args, flag)
        if path and not is_hub_id(path) and not Path(path).exists():
            raise SystemExit(f"{args.stage}: --{flag.replace('_', '-')} {path} does not exist. Fill the model volume "
                             f"first (deploy/README.md, 'Weights: the fetch Job') or fix the path; a hub id looks "
                             f"like org/name.")


def build(args: argparse.Namespace) -> Server:
    """The stage's started, SERVING server; a missing --model means the tiny default model."""
    check_models(args)
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
                                  base_model=base_model, stage_tls=stage_tls(args))
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
    allocator.keep_message_buffers()
    server = build(args)
    if args.stage != "orchestrator":
        metrics.model_loaded(args.stage, args.model or "tiny", args.device, args.dtype)
    host = args.address.rsplit(":", 1)[0]
    print(f"{args.stage} listening on {host}:{server.port}", flush=True)
    server.run_until_signal()
    return 0
