"""One stage process: `python -m sdxl_services STAGE [options]` listens, loads its weights, then serves until
SIGTERM."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from sdxl_core.loading.hub import is_hub_id
from sdxl_wire import FLOAT_DTYPES

from . import allocator, logs, metrics, tracing
from .auth import read_token
from .engine import POLICIES
from .loras import CACHE_SIZE as LORA_CACHE
from .server import Pending, Server, ServerOptions
from .tls import ChannelTls, ServerTls

STAGES = ("text_encoder", "base", "refiner", "vae", "orchestrator")
MODULES = {"text_encoder": "text_encoder", "base": "denoiser", "refiner": "denoiser", "vae": "vae"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sdxl_services", description="Run one SDXL stage server.")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--model", help="diffusers folder or single file; default: the tiny model")
    parser.add_argument("--refiner-model", help="text_encoder: the refiner's model, for its bigG")
    parser.add_argument("--vae-model", help="vae: a VAE alone (folder or single file) in place of --model's")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=FLOAT_DTYPES)
    parser.add_argument("--address", default="127.0.0.1:50051",
                        help="HOST:PORT to listen on (port 0: any free port); default: loopback only, "
                             "[::]:50051 or 0.0.0.0:50051 for every interface")
    parser.add_argument("--max-concurrency", type=int, help="requests running at once (default: 1, orchestrator 64)")
    parser.add_argument("--max-queue", type=int, help="requests waiting beyond those (default: 4, orchestrator 64)")
    parser.add_argument("--policy", choices=POLICIES, default="batch",
                        help="how the stage's engine serves the calls it holds: batch (step them together, round "
                             "robin by priority) or fifo (one at a time, to the end)")
    parser.add_argument("--max-batch-rows", type=int,
                        help="rows one unit of work may hold (denoisers: two per guided image per UNet forward; text "
                             "encoder: prompts; VAE: images per decode); default: measured on this device (denoisers, "
                             "VAE) or 64 prompts")
    parser.add_argument("--vae-tile", type=int, metavar="PIXELS",
                        help="vae: decode images larger than this a tile at a time (blended as diffusers' tiled VAE: "
                             "less memory, slightly different pixels); default: whole images, layer by layer")
    parser.add_argument("--vae-whole-pixels", type=int, metavar="PIXELS",
                        help="vae: decodes of up to this many pixels (default 512 x 512) run whole, and share a decode "
                             "with others of their size; larger ones run a layer (or tile) at a time, others taking "
                             "turns between")
    parser.add_argument("--lora-dir", metavar="DIR",
                        help="text_encoder, base, refiner: LoRA adapters (.safetensors, kohya or diffusers format) "
                             "that requests name by file stem; new files are found without a restart")
    parser.add_argument("--lora-cache", type=int, default=LORA_CACHE, metavar="N",
                        help=f"adapters kept loaded per model, least recently used out (default {LORA_CACHE})")
    parser.add_argument("--max-pixels", type=int, default=2048 * 2048, metavar="PIXELS",
                        help="base, refiner, vae: pixels per image one call may ask for, checked before any work "
                             "(default 2048 x 2048; the vae also bounds an encoded image's side by its square root)")
    parser.add_argument("--threads", type=int,
                        help="torch's CPU threads in this process (default: torch's, every core); `sdxl serve --all` "
                             "splits the cores between its processes")
    parser.add_argument("--grace", type=float, help="seconds running requests get to finish after SIGTERM")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port of --address's host")
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
    access = parser.add_argument_group("Access", "without --auth-token-file every call is let through")
    access.add_argument("--auth-token-file", metavar="PATH",
                        help="require 'authorization: Bearer TOKEN' on every call but health and reflection, TOKEN "
                             "being this file's content (whitespace stripped)")
    access.add_argument("--stage-auth-token-file", metavar="PATH",
                        help="orchestrator: the token it sends the stages; default: --auth-token-file's")
    for stage in ("text-encoder", "base", "refiner", "vae"):
        parser.add_argument(f"--{stage}", help=f"orchestrator: the {stage} stage, 'h1:p1,h2:p2' or 'dns:///name:port'")
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
        defaults = importlib.import_module(f"{__package__}.{MODULES[args.stage]}").OPTIONS
    tls = ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    given = {"max_concurrency": args.max_concurrency, "max_queue": args.max_queue, "grace_s": args.grace,
             "metrics_port": args.metrics_port, "tls": tls, "health_port": args.health_port,
             "auth_token_file": args.auth_token_file}
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


def stage_token(args: argparse.Namespace) -> str | None:
    """The token the orchestrator sends its stages, if any: --stage-auth-token-file's, else its own."""
    path = args.stage_auth_token_file or args.auth_token_file
    return read_token(path) if path else None


def check_models(args: argparse.Namespace) -> None:
    """Fail before listening when a model path is absent (an unfilled volume, a typo), naming the flag."""
    for flag in ("model", "refiner_model", "vae_model"):
        path = getattr(args, flag)
        if path and not is_hub_id(path) and not Path(path).exists():
            raise SystemExit(f"{args.stage}: --{flag.replace('_', '-')} {path} does not exist. Fill the model volume "
                             f"first (deploy/README.md, 'Weights: the fetch Job') or fix the path; a hub id looks "
                             f"like org/name.")


def load(args: argparse.Namespace):
    """The stage's servicer with its weights loaded; a missing --model means the tiny default model."""
    common = dict(device=args.device, dtype=args.dtype, policy=args.policy, max_batch_rows=args.max_batch_rows)
    if args.stage == "text_encoder":
        from .text_encoder import load_servicer

        refiner = args.refiner_model or (None if args.model else _tiny("refiner"))
        return load_servicer(args.model or _tiny("base"), refiner, **common, lora_dir=args.lora_dir,
                             lora_cache=args.lora_cache)
    if args.stage == "vae":
        from .vae import load_servicer

        return load_servicer(args.vae_model or args.model or _tiny("base"), **common, tile=args.vae_tile,
                              whole_pixels=args.vae_whole_pixels, max_pixels=args.max_pixels)
    from .denoiser import load_servicer

    return load_servicer(args.model or _tiny(args.stage), **common, max_pixels=args.max_pixels,
                         lora_dir=args.lora_dir, lora_cache=args.lora_cache)


def open_stage(args: argparse.Namespace) -> tuple[Server, Callable[[], None]]:
    """The stage's server, started and NOT_SERVING, and the function that loads its weights and makes it SERVING.
    The orchestrator holds no weights: it comes back SERVING, with a function that does nothing."""
    check_models(args)
    options = server_options(args)
    if args.stage == "orchestrator":
        from .orchestrator import build as build_orchestrator

        missing = [f"--{s}" for s in ("text_encoder", "base", "vae") if not getattr(args, s)]
        if missing:
            raise SystemExit(f"orchestrator needs {', '.join(m.replace('_', '-') for m in missing)}")
        server = build_orchestrator(args.text_encoder, args.base, args.refiner, args.vae, args.address, options,
                                    stage_tls=stage_tls(args), stage_token=stage_token(args))
        return server, lambda: None
    module = importlib.import_module(f"{__package__}.{MODULES[args.stage]}")
    pending = Pending()
    server = Server(args.stage, [(module.add_servicer, pending)], [module.SERVICE], args.address, options)
    server.start()

    def load_weights() -> None:
        pending.servicer = load(args)
        server.on_stop = getattr(pending.servicer, "close", None)
        description = pending.servicer.describe()
        description.model = args.vae_model or args.model or "tiny"
        server.set_serving(description, getattr(pending.servicer, "live_description", None))
        metrics.model_loaded(args.stage, description.model, args.device, args.dtype)

    return server, load_weights


def main(argv: list[str] | None = None) -> int:
    """Listen (health NOT_SERVING), print the "listening" line, load the weights, SERVING, serve until SIGTERM."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure()
    tracing.configure(f"sdxl-{args.stage}")
    allocator.keep_message_buffers()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    server, load_weights = open_stage(args)
    host = args.address.rsplit(":", 1)[0]
    print(f"{args.stage} listening on {host}:{server.port}", flush=True)
    try:
        load_weights()
    except BaseException:
        server.stop(0)
        raise
    server.run_until_signal()
    return 0
