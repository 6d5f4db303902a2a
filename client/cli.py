"""The sdxl command: serve (all stages or one), generate, health, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from . import launch
from .client import SDXLClient
from .output import ProgressBar, save_images


def _size(text: str) -> tuple[int, int]:
    """"WxH" -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x1024; got {text!r}") from None
    return width, height


def _serve_all_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve --all: the five stage processes; serve STAGE ...: one stage")
    p.add_argument("--all", action="store_true", required=True, help="start every stage and the orchestrator")
    p.add_argument("--base-model", help="the base model (folder or file); default: the tiny model")
    p.add_argument("--refiner-model", help="the refiner model; default: the tiny model")
    p.add_argument("--no-refiner", action="store_true", help="start no refiner stage")
    p.add_argument("--base-inpainting", action="store_true",
                   help="the base model is a 9-channel inpainting model (the orchestrator must know to reproduce seeds)")
    p.add_argument("--host", default="[::]", help="the orchestrator's listening host (default: all interfaces)")
    p.add_argument("--port", type=int, default=50051, help="the orchestrator's port; 0 picks a free one")
    p.add_argument("--device", help="every stage's device, unless placed otherwise; default: spread over the "
                                    "visible GPUs (deploy/README.md), cpu without one")
    p.add_argument("--placement", metavar="STAGE=DEV[+DEV...],...",
                   help="devices per stage, one process per device, e.g. "
                        "'base=cuda:0+cuda:1+cuda:2,refiner=cuda:3,text_encoder=cuda:3,vae=cuda:3'")
    for stage in launch.STAGES:
        p.add_argument(f"--{stage.replace('_', '-')}-device", metavar="DEV[+DEV...]",
                       help=f"the {stage} stage's device(s), e.g. cuda:0 (overrides --placement)")
    dtypes = ("float32", "float16", "bfloat16")
    p.add_argument("--dtype", choices=dtypes, help="every stage's dtype, unless its own is given; default: "
                                                   "float32 on cpu, float16 on a GPU (the VAE float32)")
    for stage in launch.STAGES:
        p.add_argument(f"--{stage.replace('_', '-')}-dtype", choices=dtypes, help=f"the {stage} stage's dtype")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds for every stage to be SERVING")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images through an orchestrator")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default="out.png", help="the image file; more images: out-1.png, ...")
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--prompt-2")
    p.add_argument("--negative", help="the negative prompt")
    p.add_argument("--negative-2", help="the negative prompt for the second text encoder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, help="guidance scale; default: the server's (5.0, 7.5 inpaint)")
    p.add_argument("--size", type=_size, help="WIDTHxHEIGHT; default 1024x1024, or the input image's size")
    p.add_argument("--seed", type=int)
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--refiner", choices=("none", "ensemble", "refine"), default="none")
    p.add_argument("--high-noise-frac", type=float, default=0.8, help="ensemble: where the refiner takes over")
    p.add_argument("--refiner-strength", type=float, help="refine: img2img strength of the refiner")
    p.add_argument("--image", type=Path, help="img2img / inpaint: the input image")
    p.add_argument("--mask", type=Path, help="inpaint: the mask, white where to repaint")
    p.add_argument("--strength", type=float)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--no-watermark", action="store_true")
    p.add_argument("--timeout", type=float, help="seconds before the request is abandoned")


def parser() -> argparse.ArgumentParser:
    """The sdxl command's argument parser (`serve STAGE ...` is passed through before parsing)."""
    p = argparse.ArgumentParser(prog="sdxl", description="Stable Diffusion XL as gRPC microservices")
    sub = p.add_subparsers(dest="command", required=True)
    _serve_all_parser(sub)
    _generate_parser(sub)
    h = sub.add_parser("health", help="grpc.health.v1 check: exit 0 when SERVING")
    h.add_argument("address")
    h.add_argument("--service", default="", help="a service name; default: the whole server")
    h.add_argument("--timeout", type=float, default=5.0)
    d = sub.add_parser("demo", help="serve --all on the tiny model, generate one image, stop")
    d.add_argument("-o", "--output", default="out.png")
    d.add_argument("--size", type=_size, default=(256, 256))
    d.add_argument("--steps", type=int, default=10)
    return p


def serve_all(args: argparse.Namespace) -> int:
    """`sdxl serve --all`: run the five processes until a stop signal."""
    try:
        options = _serve_options(args)
    except ValueError as e:
        print(f"sdxl serve --all: {e}", file=sys.stderr)
        return 2
    return launch.serve_all(options)


def _serve_options(args: argparse.Namespace) -> launch.ServeOptions:
    return launch.ServeOptions(
        base_model=args.base_model, refiner_model=args.refiner_model, no_refiner=args.no_refiner,
        base_inpainting=args.base_inpainting,
        host=args.host, port=args.port, device=args.device, placement=args.placement, dtype=args.dtype,
        start_timeout_s=args.start_timeout,
        **{f"{s}_{kind}": getattr(args, f"{s}_{kind}") for s in launch.STAGES for kind in ("device", "dtype")},
    )


def generate(args: argparse.Namespace) -> int:
    """`sdxl generate`: one Generate call, a progress bar per stage, the images written to disk."""
    width, height = args.size or (None, None)
    progress = ProgressBar()
    with SDXLClient(args.address) as client:
        try:
            result = client.generate(
                args.prompt, prompt_2=args.prompt_2, negative_prompt=args.negative,
                negative_prompt_2=args.negative_2, num_inference_steps=args.steps, guidance_scale=args.guidance,
                height=height, width=width, num_images_per_prompt=args.num_images, seed=args.seed,
                scheduler=args.scheduler, strength=args.strength, refiner=args.refiner,
                high_noise_frac=args.high_noise_frac, refiner_strength=args.refiner_strength,
                watermark=not args.no_watermark, image=args.image, mask_image=args.mask,
                on_progress=progress, timeout=args.timeout,
            )
        except grpc.RpcError as e:
            progress.end()
            print(f"sdxl generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as e:  # arguments the client refuses, unreadable --image / --mask
            print(f"sdxl generate: {e}", file=sys.stderr)
            return 2
    progress.end()
    for path in save_images(result.png, result.images, args.output):
        print(path)
    print(f"seed {result.seed}", file=sys.stderr)
    return 0


def health(args: argparse.Namespace) -> int:
    """`sdxl health`: print the grpc.health.v1 status; exit 0 only when SERVING."""
    with SDXLClient(args.address) as client:
        try:
            status = client.health(args.service, timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(status)
    return 0 if status == "SERVING" else 1


def demo(args: argparse.Namespace) -> int:
    """`sdxl demo`: what `make run` runs."""
    from .demo import run_demo

    return run_demo(args.output, size=args.size, steps=args.steps)


def main(argv: list[str] | None = None) -> int:
    """The sdxl command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"] and "--all" not in argv[1:] and not {"-h", "--help"} & set(argv[1:2]):
        # `sdxl serve STAGE ...`: become that one stage process
        os.execv(sys.executable, [sys.executable, "-m", "sdxl_services", *argv[1:]])
    args = parser().parse_args(argv)
    commands = {"serve": serve_all, "generate": generate, "health": health, "demo": demo}
    return commands[args.command](args)
