"""The in-process pipelines' call arguments -> GenerateParams and the request stream."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from google.protobuf import struct_pb2

from sdxl.v1 import denoiser_pb2, orchestrator_pb2, stage_pb2
from sdxl_wire import CHUNK_BYTES
from sdxl_wire import images as img

REFINERS = {
    "none": orchestrator_pb2.REFINER_NONE,
    "ensemble": orchestrator_pb2.REFINER_ENSEMBLE,
    "refine": orchestrator_pb2.REFINER_REFINE,
}

PRIORITIES = ("interactive", "default", "batch")
Loras = Mapping[str, float] | Sequence[str]  # LoRA adapters by name, with weights or at 1

# "plain": prompts cut at 77 tokens, as diffusers. "compel": compel's weights, .blend(), .and(), any length.
PROMPT_SYNTAXES = ("plain", "compel")

STAGE_NAMES = {
    orchestrator_pb2.STAGE_UNSPECIFIED: "unspecified",
    orchestrator_pb2.STAGE_ENCODE_PROMPT: "encode_prompt",
    orchestrator_pb2.STAGE_ENCODE_IMAGE: "encode_image",
    orchestrator_pb2.STAGE_BASE: "base",
    orchestrator_pb2.STAGE_REFINER: "refiner",
    orchestrator_pb2.STAGE_DECODE: "decode",
}

_SIZES = ("original_size", "target_size", "negative_original_size", "negative_target_size")
_COORDS = ("crops_coords_top_left", "negative_crops_coords_top_left")


def _strings(name: str, value: str | Sequence[str] | None) -> list[str]:
    # A bare str must be wrapped: protobuf would take it as a sequence of one-character prompts.
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a str or a list of str; got {value!r}")
    return list(value)


def _pair(name: str, value: Sequence[int]) -> tuple[int, int]:
    if len(value) != 2:
        raise ValueError(f"{name} must be a pair (height, width) or (top, left); got {value!r}")
    return int(value[0]), int(value[1])


def refiner_enum(refiner: str | int) -> int:
    """"none" / "ensemble" / "refine" (or the enum value itself) -> orchestrator_pb2.Refiner."""
    if isinstance(refiner, int):
        return refiner
    try:
        return REFINERS[refiner]
    except KeyError:
        raise ValueError(f"refiner must be one of {sorted(REFINERS)}; got {refiner!r}") from None


def priority_enum(priority: str | int | None) -> int:
    """"interactive" / "default" / "batch" (or the enum value itself, or None) -> sdxl.v1.Priority."""
    if priority is None or isinstance(priority, int):
        return priority or stage_pb2.PRIORITY_UNSPECIFIED
    try:
        return stage_pb2.Priority.Value(f"PRIORITY_{priority.upper()}")
    except ValueError:
        raise ValueError(f"priority must be one of {PRIORITIES}; got {priority!r}") from None


def prompt_syntax_name(prompt_syntax: str | None) -> str:
    """"plain" / "compel" as the wire's GenerateParams.prompt_syntax; None: "" (the server's default, plain)."""
    if prompt_syntax is None:
        return ""
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {PROMPT_SYNTAXES}; got {prompt_syntax!r}")
    return prompt_syntax


def infer_mode(has_image: bool, has_mask: bool) -> int:
    """image and mask_image -> inpaint, image -> img2img, neither -> text2img."""
    if has_mask and not has_image:
        raise ValueError("mask_image needs image: inpainting repaints the masked part of an image")
    if has_mask:
        return orchestrator_pb2.MODE_INPAINT
    return orchestrator_pb2.MODE_IMG2IMG if has_image else orchestrator_pb2.MODE_TEXT2IMG


def micro_conditioning(**kwargs) -> denoiser_pb2.MicroConditioning:
    """SDXL's micro-conditioning by diffusers' names; None leaves a field unset."""
    mc = denoiser_pb2.MicroConditioning()
    for name in _SIZES:
        if kwargs.get(name) is not None:
            height, width = _pair(name, kwargs[name])
            getattr(mc, name).CopyFrom(denoiser_pb2.Size(height=height, width=width))
    for name in _COORDS:
        if kwargs.get(name) is not None:
            top, left = _pair(name, kwargs[name])
            getattr(mc, name).CopyFrom(denoiser_pb2.Coords(top=top, left=left))
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if kwargs.get(name) is not None:
            setattr(mc, name, kwargs[name])
    return mc


def generate_params(
    prompt: str | Sequence[str],
    prompt_2: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int | None = None,
    seed: int | None = None,
    scheduler: str | None = None,
    scheduler_options: dict | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    strength: float | None = None,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] | None = None,
    target_size: tuple[int, int] | None = None,
    negative_original_size: tuple[int, int] | None = None,
    negative_crops_coords_top_left: tuple[int, int] | None = None,
    negative_target_size: tuple[int, int] | None = None,
    aesthetic_score: float | None = None,
    negative_aesthetic_score: float | None = None,
    refiner: str | int = "none",
    high_noise_frac: float | None = None,
    refiner_strength: float | None = None,
    refiner_steps: int | None = None,
    refiner_scheduler: str | None = None,
    watermark: bool | None = None,
    preview: bool = False,
    priority: str | int | None = None,
    prompt_syntax: str | None = None,
    loras: Loras | None = None,
    refiner_loras: Loras | None = None,
    *,
    has_image: bool = False,
    has_mask: bool = False,
) -> orchestrator_pb2.GenerateParams:
    """GenerateParams from the pipelines' arguments (diffusers' names). None leaves a field unset, and the
    server applies the in-process pipelines' default; the client decides none. `prompt_syntax` "compel"
    reads prompts in compel's syntax, of any length, as the pipelines' argument of that name. `loras` names LoRA
    adapters of the stages' --lora-dir with weights ({"pixel": 0.8}, or names alone at weight 1), on the text
    encoders and the base; `refiner_loras` the refiner's."""
    prompts = _strings("prompt", prompt)
    if not prompts:
        raise ValueError("prompt must hold at least one string")
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64); got {seed}")
    params = orchestrator_pb2.GenerateParams(
        mode=infer_mode(has_image, has_mask),
        prompt=prompts,
        prompt_2=_strings("prompt_2", prompt_2),
        negative_prompt=_strings("negative_prompt", negative_prompt),
        negative_prompt_2=_strings("negative_prompt_2", negative_prompt_2),
        num_inference_steps=num_inference_steps or 0,
        guidance_rescale=guidance_rescale,
        height=height or 0,
        width=width or 0,
        num_images_per_prompt=num_images_per_prompt or 0,
        scheduler=scheduler or "",
        micro_conditioning=micro_conditioning(
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
        ),
        refiner=refiner_enum(refiner),
        refiner_steps=refiner_steps or 0,
        refiner_scheduler=refiner_scheduler or "",
        preview=preview,
        priority=priority_enum(priority),
        prompt_syntax=prompt_syntax_name(prompt_syntax),
        loras=lora_adapters("loras", loras),
        refiner_loras=lora_adapters("refiner_loras", refiner_loras),
    )
    optional = {"guidance_scale": guidance_scale, "denoising_start": denoising_start, "denoising_end": denoising_end,
                "strength": strength, "refiner_strength": refiner_strength, "seed": seed, "watermark": watermark,
                "high_noise_frac": high_noise_frac}
    for name, value in optional.items():
        if value is not None:
            setattr(params, name, value)
    if scheduler_options:
        params.scheduler_options.CopyFrom(_struct(scheduler_options))
    return params


def lora_adapters(name: str, loras: Loras | None) -> list[stage_pb2.LoraAdapter]:
    """{"name": weight} or ["name", ...] (weight 1) as the wire's LoraAdapter list."""
    if loras is None:
        return []
    if isinstance(loras, str):
        raise ValueError(f"{name} must be a dict of name -> weight or a list of names; got the string {loras!r}")
    pairs = loras.items() if isinstance(loras, Mapping) else ((n, None) for n in loras)
    adapters = []
    for adapter, weight in pairs:
        if not isinstance(adapter, str) or not adapter:
            raise ValueError(f"{name}: adapter names must be non-empty strings; got {adapter!r}")
        if weight is not None and not isinstance(weight, (int, float)):
            raise ValueError(f"{name}: the weight of {adapter!r} must be a number; got {weight!r}")
        adapters.append(stage_pb2.LoraAdapter(name=adapter, weight=weight))
    return adapters


def parse_lora(text: str) -> tuple[str, float | None]:
    """The CLI's NAME[:WEIGHT] -> (name, weight or None)."""
    name, sep, weight = text.rpartition(":") if ":" in text else (text, "", "")
    if not name:
        raise ValueError(f"expected NAME[:WEIGHT], got {text!r}")
    try:
        return name, float(weight) if sep else None
    except ValueError:
        raise ValueError(f"the weight in {text!r} is not a number") from None


def _struct(values: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def encode_all(value) -> list[bytes]:
    """An image argument (one image or a list; PIL, bytes or path) as a list of encoded images."""
    if value is None:
        return []
    return [img.encode(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def requests(
    params: orchestrator_pb2.GenerateParams,
    images: Sequence[bytes] = (),
    masks: Sequence[bytes] = (),
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[orchestrator_pb2.GenerateRequest]:
    """The client side of Generate: params, then the encoded image(s) and mask(s) as ImageChunks."""
    yield orchestrator_pb2.GenerateRequest(params=params)
    for piece in img.chunk_all(images, chunk_bytes):
        yield orchestrator_pb2.GenerateRequest(image=piece)
    for piece in img.chunk_all(masks, chunk_bytes):
        yield orchestrator_pb2.GenerateRequest(mask_image=piece)
