"""Per-stage sizing of SDXL: parameters, weight bytes, and the peak accelerator memory of one request.

The peak is traced, not estimated: each stage's real code (the UNet inside `text2img_denoise`, the VAE in
`latents_to_images` / `images_to_latents`, the text encoders as `encode_prompt` calls them) runs on fake
tensors, which carry shapes and dtypes but no memory and do no compute, while `LiveBytes` adds up the
bytes of every tensor storage alive after each operator and keeps the maximum.

    python -m deploy.sizing                       # SDXL 1.0 (sdxl_core's constants, equal to the official configs)
    python -m deploy.sizing --base DIR --refiner DIR   # the configs of two diffusers folders
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdxl_core import configs
from sdxl_core.configs import TextEncoderConfig, UNetConfig, VAEConfig
from sdxl_core.denoise import Conditioning
from sdxl_core.request import DenoisePlan, Mode
from sdxl_core.schedulers import make_schedule
from sdxl_core.schedulers.base import Schedule
from sdxl_core.stages import text2img_denoise
from sdxl_core.text_encoders import clip_text_config
from sdxl_core.unet import UNet
from sdxl_core.vae import AutoencoderKL, images_to_latents, latents_to_images
from sdxl_services import placement

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BATCHES = (1, 4)
TOKENS = 77  # CLIP's context length
STEPS = 2  # denoising steps traced: every step peaks alike; two show what one step leaves to the next
GiB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive (tracked ones, and every operator output), and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes, while the storage lives

    def track(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage until it is freed (views of a counted storage add nothing)."""
        storage = tensor.untyped_storage()
        key = id(storage)  # the same Python object for as long as the storage lives
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


def traced_peak(modules: list[nn.Module], inputs: list[torch.Tensor], run: Callable[[], object]) -> int:
    """Peak bytes of `run()`, counting the modules' parameters and buffers and the inputs as alive throughout."""
    with torch.no_grad(), LiveBytes() as live:
        for tensor in [t for m in modules for t in (*m.parameters(), *m.buffers())] + inputs:
            live.track(tensor)
        result = run()
        del result
    return live.peak


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in `dtype`: `.to(dtype)` cannot swap the parameters of a fake module."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass(frozen=True)
class Models:
    """The configs sized: SDXL 1.0's by default."""

    base_unet: UNetConfig = configs.SDXL_BASE_UNET
    refiner_unet: UNetConfig = configs.SDXL_REFINER_UNET
    vae: VAEConfig = configs.SDXL_VAE
    clip_l: TextEncoderConfig = configs.CLIP_L
    bigg: TextEncoderConfig = configs.OPENCLIP_BIGG
    refiner_bigg: TextEncoderConfig = configs.OPENCLIP_BIGG  # the text_encoder stage loads the refiner's own

    @classmethod
    def from_folders(cls, base: str | Path, refiner: str | Path) -> Models:
        """The configs of a base and a refiner diffusers folder (config.json files only; no weights are read)."""
        base, refiner = Path(base), Path(refiner)
        return cls(
            base_unet=UNetConfig.from_diffusers(base / "unet/config.json"),
            refiner_unet=UNetConfig.from_diffusers(refiner / "unet/config.json"),
            vae=VAEConfig.from_diffusers(base / "vae/config.json"),
            clip_l=TextEncoderConfig.from_diffusers(base / "text_encoder/config.json"),
            bigg=TextEncoderConfig.from_diffusers(base / "text_encoder_2/config.json"),
            refiner_bigg=TextEncoderConfig.from_diffusers(refiner / "text_encoder_2/config.json"),
        )

    @classmethod
    def tiny(cls) -> Models:
        return cls(configs.TINY_BASE_UNET, configs.TINY_REFINER_UNET, configs.TINY_VAE, configs.TINY_CLIP_L,
                   configs.TINY_OPENCLIP_BIGG, configs.TINY_OPENCLIP_BIGG)


@dataclass(frozen=True)
class Stage:
    """One table row: `build(models)` -> the stage's modules, in the default dtype on the default device, and
    `request(modules, batch, size)` -> (the inputs the stage holds on its device, one request's call)."""

    name: str
    build: Callable[[Models], list[nn.Module]]
    request: Callable[[list[nn.Module], int, int], tuple[list[torch.Tensor], Callable[[], object]]]
    dtypes: tuple[str, ...] = tuple(DTYPES)
    calls: int = 1  # model calls per request traced: FLOPs are given per call


def _text_encoders(models: Models) -> list[nn.Module]:
    """As build_text_encoder builds them, less its `.to(dtype)` (which cannot swap fake parameters)."""
    return [(CLIPTextModelWithProjection if c.with_projection else CLIPTextModel)(clip_text_config(c))
            for c in (models.clip_l, models.bigg, models.refiner_bigg)]


def _encode_prompts(modules: list[nn.Module], batch: int, size: int):
    """The encoder calls of the stage's two encode_prompt calls (sdxl_core/prompts.py `_encode`): base ([CLIP-L,
    bigG]) and refiner ([bigG]), each for the prompt and then a negative prompt (without one the base uses zeros)."""
    clip_l, bigg, refiner_bigg = modules
    ids = torch.zeros(batch, TOKENS, dtype=torch.long)

    def encode(encoders):
        hidden, pooled = [], None
        for encoder in encoders:
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out.text_embeds if pooled is None and hasattr(out, "text_embeds") else pooled
        return torch.cat(hidden, dim=-1), pooled

    def run():
        base = [encode([clip_l, bigg]) for _ in ("prompt", "negative")]
        return base, [encode([refiner_bigg]) for _ in ("prompt", "negative")]

    return [ids], run


def _unet(config_of: Callable[[Models], UNetConfig]):
    return lambda models: [UNet(config_of(models))]


def _denoise(modules: list[nn.Module], batch: int, size: int):
    """`text2img_denoise` from noise, classifier-free guidance on (the UNet sees a batch of 2B), STEPS steps."""
    (unet,) = modules
    c, dtype = unet.config, unet.dtype
    context = torch.zeros(batch, TOKENS, c.cross_attention_dim, dtype=dtype)
    pooled = torch.zeros(batch, c.pooled_projection_dim, dtype=dtype)
    time_ids = torch.zeros(batch, c.num_time_ids, dtype=dtype)
    conditioning = Conditioning(context, pooled, time_ids, torch.zeros_like(context), torch.zeros_like(pooled),
                                torch.zeros_like(time_ids))
    with unset_fake_temporarily():  # schedules are computed with numpy
        schedule = make_schedule("euler", 50)
    schedule = _on_device(schedule)
    latent = size // 8

    def run():
        plan = DenoisePlan(Mode.TEXT2IMG, schedule, 0, STEPS, guidance_scale=5.0)
        return text2img_denoise(unet, plan, conditioning, torch.Generator().manual_seed(0), torch.device("cpu"),
                                dtype, latent_size=(latent, latent))

    tables = [schedule.timesteps, schedule.alphas_cumprod, schedule.sigmas, *schedule.extra.values()]
    return [t for t in [*vars(conditioning).values(), *tables] if t is not None], run


def _on_device(schedule: Schedule) -> Schedule:
    """The schedule's tables as the stage holds them; under fake mode, fake copies of the tables numpy computed."""
    def copy(t):
        return None if t is None else t.clone()

    extra = {k: copy(v) for k, v in schedule.extra.items()}
    return replace(schedule, timesteps=copy(schedule.timesteps), alphas_cumprod=copy(schedule.alphas_cumprod),
                   sigmas=copy(schedule.sigmas), extra=extra)


def _vae(config_of: Callable[[Models], VAEConfig]):
    return lambda models: [AutoencoderKL(config_of(models))]


def _decode(modules: list[nn.Module], batch: int, size: int):
    """Decode's `latents_to_images`: a half VAE with `force_upcast` (SDXL's) decodes in a float32 copy of itself."""
    (vae,) = modules
    latents = torch.zeros(batch, vae.config.latent_channels, size // 8, size // 8, dtype=vae.dtype)
    return [latents], lambda: latents_to_images(vae, latents)


def _encode_image(modules: list[nn.Module], batch: int, size: int):
    """Encode's `images_to_latents` (img2img; inpainting encodes the image and then the masked image alike)."""
    (vae,) = modules
    images = torch.zeros(batch, 3, size, size)  # the VAE stage's pixels are float32
    return [images], lambda: images_to_latents(vae, images, torch.Generator().manual_seed(0))


STAGES = (
    Stage("text encoder: CLIP-L + bigG (base), bigG (refiner)", _text_encoders, _encode_prompts),
    Stage("base UNet (CFG: UNet batch 2B)", _unet(lambda m: m.base_unet), _denoise, calls=STEPS),
    Stage("refiner UNet (CFG: UNet batch 2B)", _unet(lambda m: m.refiner_unet), _denoise, calls=STEPS),
    Stage("VAE decode", _vae(lambda m: m.vae), _decode),
    Stage("VAE decode, fp16-fix VAE (`force_upcast: false`)",
          _vae(lambda m: replace(m.vae, force_upcast=False)), _decode, ("fp16", "bf16")),
    Stage("VAE encode (img2img, inpaint)", _vae(lambda m: m.vae), _encode_image),
)


@dataclass(frozen=True)
class Row:
    """One stage's numbers; a (dtype, batch) left out of `peak_bytes` was not traced."""

    stage: str
    parameters: int
    weight_bytes: dict[str, int]  # by dtype name
    peak_bytes: dict[tuple[str, int], int]  # by (dtype name, batch)
    flops: int | None = None  # matmul, convolution and attention FLOPs of one call at batch 1


def _build(stage: Stage, models: Models, dtype: str) -> list[nn.Module]:
    with default_dtype(DTYPES[dtype]):
        return [m.eval() for m in stage.build(models)]


def size_stage(stage: Stage, models: Models, size: int = 1024, batches: tuple[int, ...] = BATCHES,
               dtypes: tuple[str, ...] | None = None) -> Row:
    """Parameters and weight bytes (from the modules built on the meta device), and the traced peak of one
    request for each of the stage's dtypes (or those of `dtypes` it has) and each batch."""
    dtypes = [d for d in stage.dtypes if (dtypes is None or d in dtypes) and batches]
    weights, peaks, parameters, flops = {}, {}, 0, None
    for dtype in stage.dtypes:
        with torch.device("meta"):
            modules = _build(stage, models, dtype)
        parameters = sum(p.numel() for m in modules for p in m.parameters())
        weights[dtype] = sum(t.nbytes for m in modules for t in (*m.parameters(), *m.buffers()))
    for dtype in dtypes:
        with FakeTensorMode(allow_non_fake_inputs=True):
            modules = _build(stage, models, dtype)
            for batch in batches:
                counter = FlopCounterMode(display=False) if flops is None and batch == 1 else contextlib.nullcontext()
                with counter:
                    peaks[dtype, batch] = traced_peak(modules, *stage.request(modules, batch, size))
                if isinstance(counter, FlopCounterMode):
                    flops = counter.get_total_flops() // stage.calls
    return Row(stage.name, parameters, weights, peaks, flops)


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GiB:.2f}"


def columns(batches: tuple[int, ...] = BATCHES) -> list[str]:
    """The table's columns after "stage"."""
    return ["parameters", "TFLOP per call B=1", "weights fp16/bf16", "weights fp32",
            *(f"peak {d} B={b}" for d in DTYPES for b in batches)]


def cells(row: Row, batches: tuple[int, ...] = BATCHES) -> list[str]:
    """A row's cells under `columns(batches)`: GiB (2^30 bytes) to two decimals, "—" where not computed."""
    peaks = [_gib(row.peak_bytes.get((d, b))) for d in DTYPES for b in batches]
    tflop = "—" if row.flops is None else f"{row.flops / 1e12:.2f}"
    return [f"{row.parameters:,}", tflop, _gib(row.weight_bytes.get("fp16")), _gib(row.weight_bytes.get("fp32")),
            *peaks]


def table(rows: list[Row], size: int = 1024, batches: tuple[int, ...] = BATCHES) -> str:
    """The markdown table of deploy/README.md "Sizing"."""
    lines = [["stage", *columns(batches)], ["---"] * (len(columns(batches)) + 1)]
    lines += [[row.stage, *cells(row, batches)] for row in rows]
    note = (f"One {size}x{size} request of B images at a time; memory in GiB (2^30 bytes), peaks include the "
            "weights; a UNet call is one denoising step.")
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + f"\n\n{note}\n"


# The rows whose peaks a stage process of `sdxl serve --all` reaches (the VAE's decode peaks above its encode).
PROCESS_ROWS = {"text_encoder": STAGES[0].name, "base": STAGES[1].name, "refiner": STAGES[2].name,
                "vae": STAGES[3].name}


def gpu_table(rows: list[Row], gpu_counts: tuple[int, ...] = (1, 2, 4, 8), batches: tuple[int, ...] = BATCHES) -> str:
    """The peak memory of each GPU under `sdxl serve --all`'s default placement and dtypes: the sum of the peaks
    of the processes on it (each process's allocator keeps its own peak cached). GPUs alike share a line."""
    by_name = {row.stage: row for row in rows}
    lines = [["GPUs", "GPU", "processes", *(f"peak B={b}" for b in batches)], ["---"] * (3 + len(batches))]
    for gpus in gpu_counts:
        placed = placement.default_placement(gpus)
        per_gpu: dict[str, list[str]] = {}
        for stage in placement.STAGES:
            for device in placed[stage]:
                per_gpu.setdefault(device, []).append(stage)
        groups: list[tuple[list[str], list[str]]] = []  # (devices, stages), consecutive GPUs alike together
        for device, stages in sorted(per_gpu.items(), key=lambda item: int(item[0].split(":")[1])):
            if groups and groups[-1][1] == stages:
                groups[-1][0].append(device)
            else:
                groups.append(([device], stages))
        for devices, stages in groups:
            peaks = []
            for batch in batches:
                total = sum(by_name[PROCESS_ROWS[s]].peak_bytes[_dtype_name(placement.default_dtype(s, "cuda")), batch]
                            for s in stages)
                peaks.append(_gib(total))
            gpu = devices[0] if len(devices) == 1 else f"{devices[0]} to {devices[-1]}, each"
            lines.append([str(gpus), gpu, ", ".join(stages), *peaks])
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def _dtype_name(dtype: str) -> str:
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.sizing", description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="a base diffusers folder to read the configs from (default: SDXL 1.0)")
    parser.add_argument("--refiner", help="a refiner diffusers folder (with --base)")
    parser.add_argument("--size", type=int, default=1024, help="image height and width in pixels")
    args = parser.parse_args(argv)
    if bool(args.base) != bool(args.refiner):
        parser.error("--base and --refiner go together")
    models = Models.from_folders(args.base, args.refiner) if args.base else Models()
    rows = [size_stage(stage, models, args.size) for stage in STAGES]
    sys.stdout.write(table(rows, args.size) + "\n" + gpu_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
