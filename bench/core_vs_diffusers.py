"""UNet forward, VAE decode and a whole text2img of sdxl_core against diffusers: same configs, same weights.

Run with `make bench` (or `python -m bench.core_vs_diffusers [--quick] [--device cuda --dtype float16]`).
Both sides share the very same weight tensors (or load the same folder); runs alternate
between the two and the fastest of each is compared, so the printed ratio is core time /
diffusers time from one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from sdxl_core import SDXLPipeline
from sdxl_core.configs import SDXL_BASE_UNET, SDXL_VAE, UNetConfig, VAEConfig
from sdxl_core.tiny import ensure_tiny_model
from sdxl_core.unet import UNet
from sdxl_core.vae import AutoencoderKL

# Between tiny and full size: three UNet levels, real head width (64), full-depth blocks.
MID_UNET = replace(
    SDXL_BASE_UNET, block_out_channels=(128, 256, 512), num_attention_heads=(2, 4, 8),
    transformer_layers_per_block=(1, 2, 2), cross_attention_dim=1024, pooled_projection_dim=512,
)
MID_VAE = replace(SDXL_VAE, block_out_channels=(64, 128, 256, 256))


@dataclass
class Case:
    name: str
    ours: Callable[[], torch.Tensor]
    reference: Callable[[], torch.Tensor]
    repeats: int


def _random_weights(model: torch.nn.Module, dtype, device) -> torch.nn.Module:
    """Materialise a meta-built model with small random weights (faster than real init)."""
    model = model.to_empty(device=device)
    gen = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(dtype)


def _shared(ours_cls, config, reference: torch.nn.Module) -> torch.nn.Module:
    """Our model holding the reference's own tensors (no second copy of the weights)."""
    with init_empty_weights():
        ours = ours_cls(config)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return ours.eval()


def unet_case(name: str, config: UNetConfig, latent: int, batch: int, dtype, device, repeats: int) -> Case:
    with init_empty_weights():
        reference = UNet2DConditionModel.from_config(config.to_diffusers())
    reference = _random_weights(reference, dtype, device).eval()
    ours = _shared(UNet, config, reference)
    gen = torch.Generator("cpu").manual_seed(1)
    sample = torch.randn(batch, config.in_channels, latent, latent, generator=gen).to(device, dtype)
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=gen).to(device, dtype)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=gen).to(device, dtype)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024][: config.num_time_ids]] * batch, device=device, dtype=dtype)
    t = torch.tensor([500] * batch, device=device)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    return Case(
        name, lambda: ours(sample, t, context, pooled, time_ids),
        lambda: reference(sample, t, context, added_cond_kwargs=added).sample, repeats,
    )


def vae_case(name: str, config: VAEConfig, latent: int, dtype, device, repeats: int) -> Case:
    with init_empty_weights():
        reference = DiffusersVAE.from_config(config.to_diffusers())
    reference = _random_weights(reference, dtype, device).eval()
    ours = _shared(AutoencoderKL, config, reference)
    z = torch.randn(1, config.latent_channels, latent, latent, generator=torch.Generator("cpu").manual_seed(1))
    z = z.to(device, dtype)
    return Case(name, lambda: ours.decode(z), lambda: reference.decode(z).sample, repeats)


def text2img_case(name: str, size: int, steps: int, dtype, device, repeats: int) -> Case:
    """The whole pipeline (prompt encoding, `steps` CFG steps, decode) on the tiny model, no watermark."""
    folder = ensure_tiny_model() / "base"
    ours = SDXLPipeline.from_pretrained(folder, torch_dtype=dtype, device=device, add_watermarker=False)
    reference = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, add_watermarker=False).to(device)
    reference.set_progress_bar_config(disable=True)
    kwargs = {"prompt": "a red fox in the snow", "height": size, "width": size, "num_inference_steps": steps,
              "output_type": "pt"}
    return Case(
        name, lambda: ours(seed=0, **kwargs).images,
        lambda: reference(generator=torch.Generator("cpu").manual_seed(0), **kwargs).images, repeats,
    )


def _time(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(case: Case, device) -> tuple[float, float, float]:
    best = {"ours": float("inf"), "diffusers": float("inf")}
    with torch.inference_mode():
        calls = {"ours": case.ours, "diffusers": case.reference}
        out_ours, out_ref = case.ours(), case.reference()  # warm-up, and a parity check
        diff = (out_ours.float() - out_ref.float()).abs().max().item()
        for r in range(case.repeats):
            for which in ("ours", "diffusers")[:: 1 if r % 2 else -1]:  # alternate who goes first
                best[which] = min(best[which], _time(calls[which], device))
    return best["ours"], best["diffusers"], diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the full-size cases")
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        parser.error("reduced precision is measured on a GPU only (this CPU has no bf16 support)")

    builders = [
        ("unet mid-size, 64x64 latents, batch 2", lambda n: unet_case(n, MID_UNET, 64, 2, dtype, device, 4)),
        ("vae decode mid-size, 64x64 latents", lambda n: vae_case(n, MID_VAE, 64, dtype, device, 4)),
        ("text2img tiny model, 1024x1024, 20 steps", lambda n: text2img_case(n, 1024, 20, dtype, device, 2)),
    ]
    if not args.quick:
        builders += [
            ("vae decode full-size, 64x64 latents (512 px)", lambda n: vae_case(n, SDXL_VAE, 64, dtype, device, 2)),
            ("unet full-size base, 64x64 latents, batch 2",
             lambda n: unet_case(n, SDXL_BASE_UNET, 64, 2, dtype, device, 4)),
        ]
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'case':<48} {'core s':>9} {'diffusers s':>12} {'ratio':>7} {'max|diff|':>10}")
    for name, build in builders:
        if args.only not in name:
            continue
        case = build(name)
        ours, ref, diff = run(case, device)
        print(f"{case.name:<48} {ours:>9.3f} {ref:>12.3f} {ours / ref:>7.3f} {diff:>10.2e}", flush=True)
        del case


if __name__ == "__main__":
    main()
