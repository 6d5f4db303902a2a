"""The denoiser stage, base or refiner: Denoise runs a range of a schedule (sdxl_core.stages' *_denoise).

The base and the refiner serve the same service with a different UNet; the stage reads which off the UNet.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from google.protobuf import json_format, struct_pb2

from sdxl.v1 import denoiser_pb2, denoiser_pb2_grpc, stage_pb2
from sdxl_core.denoise import Conditioning, Denoising, OnStep
from sdxl_core.latents import VAE_SCALE_FACTOR, preview
from sdxl_core.loading import load_single_file, load_unet, model_type
from sdxl_core.loading.folder import read_json
from sdxl_core.loading.hub import model_folder
from sdxl_core.lora import Loras
from sdxl_core.prompts import PromptEmbeddings
from sdxl_core.request import SCHEDULER, DenoisePlan, MicroConditioning, Mode, is_inpainting_unet, plan_denoise
from sdxl_core.schedulers import SCHEDULERS, check_options
from sdxl_core.stages import START, Draws, EncodedImage, text2img_start
from sdxl_wire.tensors import (
    DTYPES,
    FLOATS,
    expect,
    read_header_stream,
    to_proto,
    to_proto_chunks,
    wire_dtype,
    wire_float_dtype,
)

from . import calls, metrics
from .denoise_engine import DenoiseEngine, DenoiseWork, RowBudget
from .describe import struct, unet_description
from .engine import Job, priority
from .loras import CACHE_SIZE as LORA_CACHE
from .loras import LoraLibrary, adapter_key
from .server import Server, ServerOptions

SERVICE = "sdxl.v1.Denoiser"
add_servicer = denoiser_pb2_grpc.add_DenoiserServicer_to_server
# The engine holds this many calls at once, stepping them together; as many more wait for a place. A call holds
# only its embeddings and latents until it runs, so both bounds can be deep.
OPTIONS = ServerOptions(max_concurrency=64, max_queue=64)
MAX_STEPS = 1000  # the training schedule's length: more steps than timesteps is never useful
MAX_SIDE = 8192  # pixels per side when no latents are sent
MAX_PIXELS = 2048 * 2048  # per image, latents given or not (--max-pixels): bounds the work of one call
MAX_PREVIEW_BYTES = 1 << 20  # denoiser.proto: previews over 1 MiB are left out
TENSOR_NAMES = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
                "latents", "image_latents", "mask", "masked_image_latents")


@dataclass(frozen=True)
class DenoiseCall:
    """One validated Denoise call: its plan, its inputs, and the seed of its generator."""

    plan: DenoisePlan
    conditioning: Conditioning
    seed: int
    latents: torch.Tensor | None  # text2img: given starting latents
    latent_size: tuple[int, int]  # (h, w)
    image: EncodedImage | None  # img2img / inpaint
    preview: bool
    loras: Loras  # LoRA adapters on this call's rows, with their weights

    @property
    def rows(self) -> int:
        return self.conditioning.batch_size * (2 if self.plan.guided else 1)

    @property
    def key(self) -> tuple[int, int, int]:
        """Calls of one key may share a UNet forward: (h, w, context length)."""
        return (*self.latent_size, self.conditioning.prompt_embeds.shape[1])


def read_stream(requests: Iterator[denoiser_pb2.DenoiseRequest]) -> tuple[denoiser_pb2.DenoiseHeader, dict]:
    """The header (first message only) and the tensors of every message."""
    return read_header_stream(requests, "DenoiseRequest", names=TENSOR_NAMES)


def check_scalars(header: denoiser_pb2.DenoiseHeader, max_steps: int) -> None:
    """Steps and guidance in range; ValueError names the field and its range (the plan checks the rest)."""
    if header.scheduler and header.scheduler not in SCHEDULERS:
        raise ValueError(f"`scheduler` {header.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    if not 0 <= header.num_inference_steps <= max_steps:
        raise ValueError(f"`num_inference_steps` must be in [1, {max_steps}] (0: the default), "
                         f"got {header.num_inference_steps}")
    if header.HasField("guidance_scale") and not (math.isfinite(header.guidance_scale) and header.guidance_scale >= 0):
        raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {header.guidance_scale}")
    if not (math.isfinite(header.guidance_rescale) and 0 <= header.guidance_rescale <= 1):
        raise ValueError(f"`guidance_rescale` must be in [0, 1], got {header.guidance_rescale}")


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def scheduler_options(options: struct_pb2.Struct) -> dict:
    """A `scheduler_options` Struct as from_config kwargs: whole numbers (doubles on the wire) as ints."""
    try:
        options = json_format.MessageToDict(options)
    except ValueError:  # NaN or infinity, which JSON cannot hold
        raise ValueError("`scheduler_options` must hold finite numbers") from None
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in options.items()}


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    """Denoise over one UNet, whose engine advances every call it holds step by step."""

    def __init__(self, unet: torch.nn.Module, scheduler_config: dict, max_steps: int = MAX_STEPS,
                 policy: str = "batch", max_batch_rows: int | None = None, max_pixels: int = MAX_PIXELS,
                 lora_dir: str | Path | None = None, lora_cache: int = LORA_CACHE):
        self.unet, self.scheduler_config, self.max_steps = unet, dict(scheduler_config), max_steps
        self.max_pixels = max_pixels
        self.loras = LoraLibrary(lora_dir, {"unet": unet}, lora_cache)
        self.stage = model_type(unet.config)  # base, refiner or inpainting: the server's and the metrics' name
        self.engine = DenoiseEngine(unet, self.stage, policy, RowBudget(max_batch_rows))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def describe(self) -> stage_pb2.StageDescription:
        return stage_pb2.StageDescription(
            model_kind=self.stage, dtype=wire_dtype(self.unet.dtype), device=str(self.device),
            unet=unet_description(self.unet.config), scheduler_config=struct(self.scheduler_config),
            limits=stage_pb2.StageLimits(max_steps=self.max_steps, max_side=MAX_SIDE))

    def live_description(self) -> stage_pb2.StageDescription:
        """The adapters in --lora-dir now."""
        return stage_pb2.StageDescription(loras=self.loras.names())

    def Denoise(self, request_iterator, context):
        """Header and tensors in; progress per step, then the latents, out. This thread decodes and checks the
        request and relays its events; the engine's worker runs the UNet and drops the job once the call ends."""
        yield denoiser_pb2.DenoiseResponse(admitted=denoiser_pb2.Admitted())  # before the request is read
        header, tensors = read_stream(request_iterator)
        call = self.prepare(header, tensors)
        metrics.observe_batch(self.stage, "Denoise", call.conditioning.batch_size)
        work = DenoiseWork(partial(self.start, call), call.key, call.rows, call.loras)
        job = self.engine.submit(Job(work, priority(header.priority), calls.deadline(context), calls.watch(context)))
        for kind, value in self.engine.events(job):
            if kind == "progress":
                yield denoiser_pb2.DenoiseResponse(progress=self.progress(*value, call.preview))
            else:
                for chunk in to_proto_chunks("latents", value):
                    yield denoiser_pb2.DenoiseResponse(chunk=chunk)

    def close(self) -> None:
        self.engine.stop()

    def progress(self, step: int, total: int, latents: torch.Tensor, with_preview: bool):
        """A progress event, with a preview when asked for and small enough."""
        event = denoiser_pb2.DenoiseProgress(step=step, total=total)
        if with_preview and latents.shape[1] == 4:
            small = preview(latents)
            if small.numel() <= MAX_PREVIEW_BYTES:
                event.preview.CopyFrom(to_proto(small, "preview"))
        return event

    def prepare(self, header: denoiser_pb2.DenoiseHeader, tensors: dict) -> DenoiseCall:
        """Check the header and tensors against the UNet and each other; ValueError names the field."""
        check_scalars(header, self.max_steps)
        loras = self.loras.resolve(adapter_key(header.loras))
        config, dims = self.unet.config, {}
        context, pooled = ("B", "L", config.cross_attention_dim), ("B", config.pooled_projection_dim)
        embeds = [expect(tensors, "prompt_embeds", context, FLOATS, dims),
                  expect(tensors, "pooled_prompt_embeds", pooled, FLOATS, dims)]
        check_sizes(dims, {"B": "the batch", "L": "the prompt's tokens"})
        check_context_lengths(tensors)
        latents = expect(tensors, "latents", ("B", 4, "h", "w"), FLOATS, dims, required=False)
        image = self.image_inputs(tensors, dims)
        if latents is not None and image is not None:
            raise ValueError("send `latents` (text2img) or `image_latents` / `mask` (img2img, inpaint), not both")
        mode = Mode.TEXT2IMG if image is None else Mode.INPAINT if image.mask is not None else Mode.IMG2IMG
        plan = self.plan(header, mode)
        if image is not None and image.image_latents is None and plan.needs_image_latents(config.in_channels):
            raise ValueError("`image_latents` are required, except by an inpainting UNet at strength 1")
        negatives = [expect(tensors, "negative_prompt_embeds", context, FLOATS, dims, required=plan.guided),
                     expect(tensors, "negative_pooled_prompt_embeds", pooled, FLOATS, dims, required=plan.guided)]
        if image is not None:
            check_divides_batch(dims)
            image = replace(image, draws=self.draws(header, dims["B"]))
        elif header.HasField("encode_draws"):
            raise ValueError("`encode_draws` come with `image_latents` or a `mask`")
        size = self.latent_size(header, dims)
        embeds += negatives if plan.guided else [None, None]
        embeddings = PromptEmbeddings(*(None if e is None else e.to(self.device, self.unet.dtype) for e in embeds))
        pixels = (header.height, header.width) if header.height and header.width else \
            (size[0] * VAE_SCALE_FACTOR, size[1] * VAE_SCALE_FACTOR)
        time_ids = micro_conditioning(header.micro_conditioning).time_ids(config, *pixels, from_image=image is not None)
        conditioning = Conditioning.from_prompt(embeddings, *time_ids)
        seed = header.seed if header.HasField("seed") else secrets.randbits(63)
        return DenoiseCall(plan, conditioning, seed, latents, size, image, header.preview, loras)

    def plan(self, header: denoiser_pb2.DenoiseHeader, mode: Mode) -> DenoisePlan:
        """The request's plan over this UNet and the model's scheduler config with the request's overrides."""
        options = scheduler_options(header.scheduler_options)
        steps = header.num_inference_steps or None
        check_options(header.scheduler or SCHEDULER, options, self.scheduler_config, steps)
        try:
            plan = plan_denoise(
                self.unet.config, {**self.scheduler_config, **options}, mode,
                num_inference_steps=steps, scheduler=header.scheduler or None,
                guidance_scale=_optional(header, "guidance_scale"), guidance_rescale=header.guidance_rescale,
                strength=_optional(header, "strength"), denoising_start=_optional(header, "denoising_start"),
                denoising_end=_optional(header, "denoising_end"), device=self.device)
        except (TypeError, KeyError) as exc:  # a mistyped scheduler option; ValueErrors already name theirs
            name = header.scheduler or SCHEDULER
            raise ValueError(f"`scheduler_options` do not fit scheduler {name!r}: {exc}") from None
        if not 0 <= plan.start < plan.end <= plan.schedule.num_steps:
            raise ValueError(f"`denoising_start` / `denoising_end` leave no step of the {plan.schedule.num_steps} "
                             f"of this schedule to run; raise `num_inference_steps`")
        return plan

    def image_inputs(self, tensors: dict, dims: dict) -> EncodedImage | None:
        """image_latents, mask and masked_image_latents checked against the UNet; None without them."""
        image_latents = expect(tensors, "image_latents", ("N", 4, "h", "w"), FLOATS, dims, required=False)
        mask = expect(tensors, "mask", ("M", 1, "h", "w"), FLOATS, dims, required=False)
        masked = expect(tensors, "masked_image_latents", ("K", 4, "h", "w"), FLOATS, dims, required=False)
        check_sizes(dims, {"N": "`image_latents`", "M": "`mask`", "K": "`masked_image_latents`"})
        if is_inpainting_unet(self.unet.config.in_channels) and (mask is None or masked is None):
            raise ValueError("this inpainting UNet (9 input channels) needs `mask` and `masked_image_latents`")
        if mask is None and masked is not None:
            raise ValueError("`masked_image_latents` come with a `mask`")
        if image_latents is None and mask is None:
            return None
        return EncodedImage(image_latents, mask, masked)

    def draws(self, header: denoiser_pb2.DenoiseHeader, batch_size: int) -> Draws:
        """The VAE stage's draws to skip, each count in [0, batch size]."""
        d = header.encode_draws
        for name in ("image_samples", "masked_image_samples"):
            if not 0 <= getattr(d, name) <= batch_size:
                raise ValueError(f"`encode_draws.{name}` must be in [0, {batch_size}], got {getattr(d, name)}")
        dtype = wire_float_dtype("encode_draws.dtype", d.dtype) if header.HasField("encode_draws") else torch.float32
        return Draws(d.image_samples, d.masked_image_samples, dtype)

    def latent_size(self, header, dims: dict) -> tuple[int, int]:
        """(h, w): the tensors', or height / width / 8 when only noise is drawn; at most max_pixels either way."""
        h, w = (dims["h"], dims["w"]) if "h" in dims else self._noise_size(header)
        if not (h >= 1 and w >= 1 and h * w * VAE_SCALE_FACTOR**2 <= self.max_pixels):
            raise ValueError(f"the image of {h * VAE_SCALE_FACTOR}x{w * VAE_SCALE_FACTOR} pixels (latents {h}x{w}) "
                             f"must hold 1 to {self.max_pixels} pixels (this stage's --max-pixels)")
        return h, w

    def _noise_size(self, header) -> tuple[int, int]:
        """height / width / 8, the UNet's default size where unset."""
        default = self.unet.config.sample_size * VAE_SCALE_FACTOR  # as the pipeline: 1024 for SDXL
        sides = []
        for name in ("height", "width"):
            value = getattr(header, name) or default
            if not (0 < value <= MAX_SIDE and value % VAE_SCALE_FACTOR == 0):
                raise ValueError(f"`{name}` must be a multiple of {VAE_SCALE_FACTOR} in [8, {MAX_SIDE}] when no "
                                 f"latents are sent, got {value}")
            sides.append(value // VAE_SCALE_FACTOR)
        return sides[0], sides[1]

    def start(self, call: DenoiseCall, on_step: OnStep) -> Denoising:
        """The call's run, on a CPU generator seeded with the request's seed (DESIGN.md "Seeds")."""
        generator = torch.Generator("cpu").manual_seed(call.seed)
        common = dict(generator=generator, device=self.device, dtype=self.unet.dtype, on_step=on_step)
        if call.plan.mode is Mode.TEXT2IMG:
            return text2img_start(self.unet.config, call.plan, call.conditioning, latents=call.latents,
                                  latent_size=call.latent_size, **common)
        return START[call.plan.mode](self.unet.config, call.plan, call.conditioning, call.image, **common)


def check_sizes(dims: dict, names: dict[str, str]) -> None:
    """ValueError if a dimension of the request's tensors is empty (the model cannot run on nothing)."""
    for letter, name in names.items():
        if dims.get(letter) == 0:
            raise ValueError(f"{name} must not be empty, got a size of 0")


def check_context_lengths(tensors: dict) -> None:
    """A context of any length serves (compel's are 77k tokens), but the negative's must be the prompt's."""
    positive, negative = tensors["prompt_embeds"], tensors.get("negative_prompt_embeds")
    if negative is not None and negative.ndim == 3 and negative.shape[1] != positive.shape[1]:
        raise ValueError(f"`negative_prompt_embeds` has {negative.shape[1]} tokens but `prompt_embeds` "
                         f"{positive.shape[1]}: pad the shorter to the other's length with the empty prompt's "
                         f"embedding, as compel's pad_conditioning_tensors_to_same_length does")


def check_divides_batch(dims: dict) -> None:
    for name, letter in (("image_latents", "N"), ("mask", "M"), ("masked_image_latents", "K")):
        if letter in dims and dims["B"] % dims[letter]:
            raise ValueError(f"`{name}` holds {dims[letter]} images, which must divide the batch of {dims['B']}")


def micro_conditioning(mc: denoiser_pb2.MicroConditioning) -> MicroConditioning:
    """The wire's MicroConditioning; unset fields take the request semantics' defaults."""
    scores = {name: getattr(mc, name) for name in ("aesthetic_score", "negative_aesthetic_score") if mc.HasField(name)}
    return MicroConditioning(
        _size(mc, "original_size"), _coords(mc, "crops_coords_top_left"), _size(mc, "target_size"),
        _size(mc, "negative_original_size"), _coords(mc, "negative_crops_coords_top_left"),
        _size(mc, "negative_target_size"), **scores)


def _size(mc, name: str) -> tuple[int, int] | None:
    if not mc.HasField(name):
        return None
    size = getattr(mc, name)
    if size.height <= 0 or size.width <= 0:
        raise ValueError(f"`micro_conditioning.{name}` must be positive, got {size.height}x{size.width}")
    return size.height, size.width


def _coords(mc, name: str) -> tuple[int, int]:
    coords = getattr(mc, name)
    return coords.top, coords.left


def load_denoiser(model: str | Path, device: str = "cpu", dtype: str = "float32") -> tuple[torch.nn.Module, dict]:
    """The UNet and scheduler config of a diffusers folder or an original single file; nothing else is read."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if Path(model).is_file():
        components = load_single_file(model, torch_dtype=DTYPES[dtype], device=device)
        return components.unet, components.scheduler_config
    root = model_folder(model)
    unet = load_unet(root / "unet", DTYPES[dtype], device=device)
    return unet, read_json(root / "scheduler" / "scheduler_config.json")


def load_servicer(model: str | Path, device: str = "cpu", dtype: str = "float32", **engine) -> DenoiserServicer:
    return DenoiserServicer(*load_denoiser(model, device, dtype), **engine)


def make_server(servicer: DenoiserServicer, address: str = "[::]:0", options: ServerOptions = OPTIONS) -> Server:
    """A started, SERVING Denoiser server named after its UNet's type (base, refiner, inpainting)."""
    server = Server(servicer.stage, [(add_servicer, servicer)], [SERVICE], address, options, on_stop=servicer.close)
    server.start()
    server.set_serving(servicer.describe(), servicer.live_description)
    return server


def build(model: str | Path, device: str = "cpu", dtype: str = "float32", address: str = "[::]:0",
          options: ServerOptions = OPTIONS, **engine) -> Server:
    """Load the UNet and scheduler config, then a started, SERVING Denoiser server; `engine`: policy and
    max_batch_rows, as DenoiserServicer takes them."""
    return make_server(load_servicer(model, device, dtype, **engine), address, options)
