"""The sdxl command: serve (all stages or one), generate, health, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from .client import SDXLClient
from .output import ProgressBar, save_images
from .params import PRIORITIES, PROMPT_SYNTAXES, parse_lora


def _size(text: str) -> tuple[int, int]:
    """"WxH" -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x1024; got {text!r}") from None
    return width, height


def _lora(text: str) -> tuple[str, float | None]:
    try:
        return parse_lora(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _serve_parser(sub) -> None:
    # Only for `sdxl --help`: main() hands `serve` to the services before parsing (sdxl_services.launch).
    sub.add_parser("serve", help="serve --all: the five stage processes (--help for its options); "
                                 "serve STAGE ...: one stage (python -m sdxl_services --help)")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images through an orchestrator")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default="out.png", help="the image file; more images: out-1.png, ...")
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--token-file", type=Path, metavar="PATH",
                   help="send this file's token (whitespace stripped) as 'authorization: Bearer TOKEN', for a "
                        "server started with --auth-token-file")
    p.add_argument("--prompt-2")
    p.add_argument("--negative", help="the negative prompt")
    p.add_argument("--negative-2", help="the negative prompt for the second text encoder")
    p.add_argument("--prompt-syntax", choices=PROMPT_SYNTAXES,
                   help="compel: weights as (word)1.3, word++, word--, (word:1.3), .blend(), .and(), and prompts "
                        "longer than 77 tokens; default: plain (cut at 77 tokens)")
    p.add_argument("--lora", type=_lora, action="append", metavar="NAME[:WEIGHT]",
                   help="a LoRA adapter of the stages' --lora-dir (its file name without .safetensors) on the text "
                        "encoders and the base, at WEIGHT (default 1); repeat for more")
    p.add_argument("--refiner-lora", type=_lora, action="append", metavar="NAME[:WEIGHT]",
                   help="a LoRA adapter for the refiner's UNet and text encoder (with --refiner); repeatable")
    p.add_argument("--steps", type=int, help="num_inference_steps; default: the server's (50)")
    p.add_argument("--guidance", type=float, help="guidance scale; default: the server's (5.0, 7.5 inpaint)")
    p.add_argument("--size", type=_size, help="WIDTHxHEIGHT; default 1024x1024, or the input image's size")
    p.add_argument("--seed", type=int)
    p.add_argument("--scheduler", help="euler (the server's default), euler_a, heun, lms, ddim, dpmpp_2m, "
                                       "dpmpp_2m_karras, unipc")
    p.add_argument("--refiner", choices=("none", "ensemble", "refine"), default="none")
    p.add_argument("--high-noise-frac", type=float,
                   help="ensemble: where the refiner takes over; default: the server's (0.8)")
    p.add_argument("--refiner-strength", type=float,
                   help="refine: img2img strength of the refiner; default: the server's (0.3)")
    p.add_argument("--image", type=Path, help="img2img / inpaint: the input image")
    p.add_argument("--mask", type=Path, help="inpaint: the mask, white where to repaint")
    p.add_argument("--strength", type=float, help="img2img / inpaint; default: the server's (0.3, 0.9999 inpaint)")
    p.add_argument("--num-images", type=int, help="images per prompt; default: 1")
    p.add_argument("--no-watermark", action="store_true")
    p.add_argument("--priority", choices=PRIORITIES,
                   help="how the stages order this request among others' (interactive first); default: default")
    p.add_argument("--timeout", type=float, help="seconds before the request is abandoned")


def parser() -> argparse.ArgumentParser:
    """The sdxl command's argument parser (`serve STAGE ...` is passed through before parsing)."""
    p = argparse.ArgumentParser(prog="sdxl", description="Stable Diffusion XL as gRPC microservices")
    sub = p.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
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


def _token(path: Path | None) -> str | None:
    """--token-file's token, whitespace stripped."""
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"--token-file {path} is empty")
    return token


def generate(args: argparse.Namespace) -> int:
    """`sdxl generate`: one Generate call, a progress bar per stage, the images written to disk."""
    width, height = args.size or (None, None)
    try:
        token = _token(args.token_file)
    except (OSError, ValueError) as e:
        print(f"sdxl generate: {e}", file=sys.stderr)
        return 2
    progress = ProgressBar()
    with SDXLClient(args.address, token=token) as client:
        try:
            result = client.generate(
                args.prompt, prompt_2=args.prompt_2, negative_prompt=args.negative,
                negative_prompt_2=args.negative_2, num_inference_steps=args.steps, guidance_scale=args.guidance,
                height=height, width=width, num_images_per_prompt=args.num_images, seed=args.seed,
                scheduler=args.scheduler, strength=args.strength, refiner=args.refiner,
                high_noise_frac=args.high_noise_frac, refiner_strength=args.refiner_strength,
                watermark=False if args.no_watermark else None, priority=args.priority,
                prompt_syntax=args.prompt_syntax, loras=dict(args.lora or []),
                refiner_loras=dict(args.refiner_lora or []), image=args.image, mask_image=args.mask,
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
    if argv[:1] == ["serve"]:  # server-side code, imported only here: the client package stays light
        if "--all" in argv[1:] or {"-h", "--help"} & set(argv[1:2]):
            from sdxl_services.launch import main as serve_all

            return serve_all(argv[1:])
        # `sdxl serve STAGE ...`: become that one stage process
        os.execv(sys.executable, [sys.executable, "-m", "sdxl_services", *argv[1:]])
    args = parser().parse_args(argv)
    commands = {"generate": generate, "health": health, "demo": demo}
    return commands[args.command](args)
