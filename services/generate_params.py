"""The orchestrator's reading of a Generate stream: limits, checks that name the field, and the defaults."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from sdxl.v1 import orchestrator_pb2, stage_pb2, tensor_pb2
from sdxl_core.prompt_syntax import parse_prompt
from sdxl_core.prompts import check_prompt_syntax
from sdxl_core.request import HIGH_NOISE_FRAC, SCHEDULER, Mode, from_pure_noise, guidance_scale_for, strength_for
from sdxl_core.schedulers import SCHEDULERS, check_options

from .denoiser import scheduler_options
from .errors import FailedPrecondition
from .loras import adapter_key

TEXT2IMG, IMG2IMG, INPAINT = orchestrator_pb2.MODE_TEXT2IMG, orchestrator_pb2.MODE_IMG2IMG, orchestrator_pb2.MODE_INPAINT
NONE, ENSEMBLE, REFINE = orchestrator_pb2.REFINER_NONE, orchestrator_pb2.REFINER_ENSEMBLE, orchestrator_pb2.REFINER_REFINE
MODES = {TEXT2IMG: Mode.TEXT2IMG, IMG2IMG: Mode.IMG2IMG, INPAINT: Mode.INPAINT}


@dataclass(frozen=True)
class Limits:
    """What one Generate may ask for; generous for SDXL, bounded so one request cannot take a stage hostage."""

    min_size: int = 64
    max_size: int = 2048
    max_steps: int = 200
    max_images: int = 8  # len(prompt) * num_images_per_prompt
    max_image_bytes: int = 32 * 2**20  # all init images and masks together, encoded


@dataclass
class Generate:
    """A checked request: its params, the image and mask chunks as they came, and the seed every stage uses."""

    params: orchestrator_pb2.GenerateParams
    images: list[tensor_pb2.ImageChunk] = field(default_factory=list)
    masks: list[tensor_pb2.ImageChunk] = field(default_factory=list)
    seed: int = 0

    @property
    def batch_size(self) -> int:
        return len(self.params.prompt) * (self.params.num_images_per_prompt or 1)

    @property
    def mode(self) -> Mode:
        return MODES[self.params.mode]

    @property
    def guidance_scale(self) -> float:
        return guidance_scale_for(self.mode, _value(self.params, "guidance_scale"))

    @property
    def high_noise_frac(self) -> float:
        """The ensemble's handoff: where the base stops and the refiner starts."""
        return handoff(self.params)

    def from_pure_noise(self) -> bool:
        p = self.params
        return from_pure_noise(self.mode, strength_for(self.mode, _value(p, "strength")), _value(p, "denoising_start"))


def read_generate(requests: Iterable[orchestrator_pb2.GenerateRequest], limits: Limits, has_refiner: bool) -> Generate:
    """The client's stream -> a checked Generate; ValueError (INVALID_ARGUMENT) or FailedPrecondition."""
    requests = iter(requests)
    first = next(requests, None)
    if first is None or first.WhichOneof("payload") != "params":
        raise ValueError("a Generate stream starts with GenerateParams")
    request = Generate(first.params)
    total = 0
    for message in requests:
        kind = message.WhichOneof("payload")
        if kind not in ("image", "mask_image"):
            raise ValueError(f"after GenerateParams only image and mask_image chunks may follow, got {kind}")
        chunk = getattr(message, kind)
        total += len(chunk.data)
        if total > limits.max_image_bytes:
            raise ValueError(f"image and mask_image bytes must be at most {limits.max_image_bytes} in all")
        (request.images if kind == "image" else request.masks).append(chunk)
    check_params(request, limits, has_refiner)
    request.seed = request.params.seed if request.params.HasField("seed") else secrets.randbits(63)
    return request


def _in(name: str, value, low, high, low_open=False, high_open=False) -> None:
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and (
        value < high if high_open else value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be in {span}, got {value!r}")


def _optional(p, name: str, *bounds, **open_ends) -> None:
    if p.HasField(name):
        _in(name, getattr(p, name), *bounds, **open_ends)


def check_params(request: Generate, limits: Limits, has_refiner: bool) -> None:
    """Every field within its range, images where the mode needs them, a refiner where one is asked for."""
    p = request.params
    _check_prompts(p)
    _check_loras(p)
    _check_sizes(p, limits)
    for name in ("num_inference_steps", "refiner_steps"):
        if getattr(p, name):  # 0: the default
            _in(name, getattr(p, name), 1, limits.max_steps)
    _in("num_images_per_prompt", p.num_images_per_prompt, 0, limits.max_images)
    if request.batch_size > limits.max_images:
        raise ValueError(f"len(prompt) * num_images_per_prompt must be at most {limits.max_images}, "
                         f"got {len(p.prompt)} * {p.num_images_per_prompt}")
    _optional(p, "guidance_scale", 0, 1e4)
    _in("guidance_rescale", p.guidance_rescale, 0, 1)
    for name in ("denoising_start", "denoising_end", "high_noise_frac"):
        _optional(p, name, 0, 1, low_open=True, high_open=True)
    for name in ("strength", "refiner_strength"):
        _optional(p, name, 0, 1, low_open=True)
    if p.HasField("denoising_start") and p.HasField("denoising_end") and p.denoising_start >= p.denoising_end:
        raise ValueError(f"`denoising_start` ({p.denoising_start}) must be below `denoising_end` ({p.denoising_end})")
    for name in ("scheduler", "refiner_scheduler"):
        if getattr(p, name) and getattr(p, name) not in SCHEDULERS:
            raise ValueError(f"`{name}` must be one of {', '.join(SCHEDULERS)}, got {getattr(p, name)!r}")
    _check_scheduler_options(p)
    if p.priority not in stage_pb2.Priority.values():
        raise ValueError(f"`priority` must be one of {', '.join(stage_pb2.Priority.keys())}, got {p.priority}")
    _check_mode(request)
    _check_refiner(p, has_refiner)


def _check_scheduler_options(p) -> None:
    """The options against each scheduler they go to, over SDXL 1.0's config (each denoiser checks them again
    over its model's)."""
    if not p.HasField("scheduler_options"):
        return
    options = scheduler_options(p.scheduler_options)
    check_options(p.scheduler or SCHEDULER, options)
    if p.refiner == REFINE and p.refiner_scheduler:
        check_options(p.refiner_scheduler, options)


def _check_loras(p) -> None:
    """Adapter names and weights well formed (the stages say whether they have them); refiner_loras need a
    refiner."""
    for name in ("loras", "refiner_loras"):
        try:
            adapter_key(getattr(p, name))
        except ValueError as error:
            raise ValueError(f"`{name}`: {error}") from None
    if p.refiner_loras and p.refiner == orchestrator_pb2.REFINER_NONE:
        raise ValueError("`refiner_loras` are for the refiner: set `refiner` too")


def _check_prompts(p) -> None:
    if not p.prompt:
        raise ValueError("`prompt` must hold at least one string")
    for name in ("prompt_2", "negative_prompt", "negative_prompt_2"):
        n = len(getattr(p, name))
        if n not in (0, 1, len(p.prompt)):
            raise ValueError(f"`{name}` has {n} strings, but `prompt` has {len(p.prompt)}; send none, one, "
                             f"or {len(p.prompt)}")
    _check_prompt_syntax(p)


def _check_prompt_syntax(p) -> None:
    """A known syntax, and under "compel" prompts it reads (the text encoder checks their length)."""
    check_prompt_syntax(p.prompt_syntax or "plain")
    if p.prompt_syntax != "compel":
        return
    for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
        for text in getattr(p, name):
            try:
                parse_prompt(text)
            except ValueError as error:
                raise ValueError(f"`{name}`: {error}") from None


def _check_sizes(p, limits: Limits) -> None:
    for name in ("height", "width"):
        value = getattr(p, name)
        if value and (value % 8 or not limits.min_size <= value <= limits.max_size):
            raise ValueError(f"`{name}` must be a multiple of 8 in [{limits.min_size}, {limits.max_size}] "
                             f"(or 0 for the default), got {value}")


def _check_mode(request: Generate) -> None:
    p = request.params
    if p.mode not in (TEXT2IMG, IMG2IMG, INPAINT):
        raise ValueError(f"`mode` must be MODE_TEXT2IMG, MODE_IMG2IMG or MODE_INPAINT, got {p.mode}")
    if p.mode == TEXT2IMG:
        for name in ("denoising_start", "strength"):
            if p.HasField(name):
                raise ValueError(f"`{name}` is for MODE_IMG2IMG and MODE_INPAINT only")
    if p.mode != TEXT2IMG and not request.images:
        raise ValueError(f"`image` is required for {orchestrator_pb2.Mode.Name(p.mode)}")
    if p.mode == TEXT2IMG and request.images:
        raise ValueError("`image` is for MODE_IMG2IMG and MODE_INPAINT only")
    if p.mode == INPAINT and not request.masks:
        raise ValueError("`mask_image` is required for MODE_INPAINT")
    if p.mode != INPAINT and request.masks:
        raise ValueError("`mask_image` is for MODE_INPAINT only")


def _check_refiner(p, has_refiner: bool) -> None:
    if p.refiner not in (NONE, ENSEMBLE, REFINE):
        raise ValueError(f"`refiner` must be REFINER_NONE, REFINER_ENSEMBLE or REFINER_REFINE, got {p.refiner}")
    if p.refiner == ENSEMBLE and p.HasField("denoising_end"):
        raise ValueError("`denoising_end` must be unset with REFINER_ENSEMBLE; set `high_noise_frac`")
    if p.refiner == ENSEMBLE and p.HasField("denoising_start") and p.denoising_start >= handoff(p):
        raise ValueError(f"`denoising_start` ({p.denoising_start}) must be below `high_noise_frac` ({handoff(p)})")
    if p.refiner != NONE and not has_refiner:
        raise FailedPrecondition(f"{orchestrator_pb2.Refiner.Name(p.refiner)} asked for, but this orchestrator "
                                 f"has no refiner stage configured")


def handoff(p: orchestrator_pb2.GenerateParams) -> float:
    """The ensemble's `high_noise_frac`: where the base stops and the refiner starts."""
    return _value(p, "high_noise_frac") or HIGH_NOISE_FRAC


def _value(message, name: str):
    """An optional field's value, None when unset."""
    return getattr(message, name) if message.HasField(name) else None
