"""Request semantics: what a request means when it leaves an argument out, and the rules that turn its
arguments into one denoise. The in-process pipelines, the denoiser stage and the orchestrator read them
here and nowhere else.

Defaults are those of diffusers 0.42.1's StableDiffusionXL{,Img2Img,Inpaint}Pipeline.__call__
(pipelines/stable_diffusion_xl/), and the ensemble handoff of the diffusers SDXL docs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from sdxl_core.configs import UNetConfig
from sdxl_core.denoise import Size, img2img_time_ids, text2img_time_ids
from sdxl_core.ranges import check_range, end_index, start_index, strength_start_index
from sdxl_core.schedulers import Schedule, make_schedule


class Mode(enum.Enum):
    TEXT2IMG = "text2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


NUM_INFERENCE_STEPS = 50
SCHEDULER = "euler"  # EulerDiscreteScheduler, the SDXL checkpoints' own
GUIDANCE_SCALE = {Mode.TEXT2IMG: 5.0, Mode.IMG2IMG: 5.0, Mode.INPAINT: 7.5}
STRENGTH = {Mode.IMG2IMG: 0.3, Mode.INPAINT: 0.9999}  # just under 1: inpainting keeps a trace of the image
HIGH_NOISE_FRAC = 0.8  # the ensemble of expert denoisers: the base runs the first 80% of the schedule
REFINER_STRENGTH = STRENGTH[Mode.IMG2IMG]  # refine after: the refiner runs img2img on the base's latents
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
LATENT_CHANNELS = 4
INPAINTING_IN_CHANNELS = 9  # latents 4 + mask 1 + masked image latents 4


def is_inpainting_unet(in_channels: int) -> bool:
    """A 9-channel inpainting UNet, which sees the mask and the masked image's latents as extra inputs."""
    return in_channels == INPAINTING_IN_CHANNELS


def guidance_scale_for(mode: Mode, given: float | None = None) -> float:
    return GUIDANCE_SCALE[mode] if given is None else given


def strength_for(mode: Mode, given: float | None = None) -> float | None:
    """The request's strength, its mode's default, or None (text-to-image runs the whole range)."""
    return STRENGTH.get(mode) if given is None else given


def from_pure_noise(mode: Mode, strength: float | None, denoising_start: float | None) -> bool:
    """Inpainting at strength 1 with no `denoising_start` starts from pure noise (diffusers' `is_strength_max`)."""
    return mode is Mode.INPAINT and strength == 1.0 and denoising_start is None


def needs_image_latents(in_channels: int, from_noise: bool) -> bool:
    """Whether a denoise from an image needs the image's latents: all but a 9-channel UNet starting from pure
    noise, which sees the image only through the masked image's latents."""
    return not (is_inpainting_unet(in_channels) and from_noise)


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning (and the refiner's aesthetic scores), by diffusers' names.

    Sizes left out are the image's (height, width); the negative sizes are the positive ones.
    """

    original_size: Size | None = None
    crops_coords_top_left: Size = (0, 0)
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: Size = (0, 0)
    negative_target_size: Size | None = None
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE

    def time_ids(self, config: UNetConfig, height: int, width: int, from_image: bool):
        """(time_ids, negative_time_ids) as the pipeline that runs this request builds them: img2img's (with
        aesthetic scores for a refiner-type UNet) when it starts from an image or the UNet is a refiner."""
        sizes = (self.original_size or (height, width), self.crops_coords_top_left, self.target_size or (height, width),
                 self.negative_original_size, self.negative_crops_coords_top_left, self.negative_target_size)
        if from_image or config.requires_aesthetics_score:
            return img2img_time_ids(config, *sizes, aesthetic_score=self.aesthetic_score,
                                    negative_aesthetic_score=self.negative_aesthetic_score)
        return text2img_time_ids(config, *sizes)


@dataclass(frozen=True)
class DenoisePlan:
    """One denoise: the schedule, the steps [start, end) it runs, and how it starts."""

    mode: Mode
    schedule: Schedule
    start: int
    end: int
    guidance_scale: float
    guidance_rescale: float = 0.0
    add_noise: bool = True  # False with `denoising_start`: the image latents are the start as they are
    from_noise: bool = False  # inpainting at strength 1: the start is pure noise

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1

    def needs_image_latents(self, in_channels: int) -> bool:
        return needs_image_latents(in_channels, self.from_noise)


def plan_denoise(
    unet_config: UNetConfig,
    scheduler_config: dict,
    mode: Mode,
    *,
    num_inference_steps: int | None = None,
    scheduler: str | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    strength: float | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    device: torch.device | str = "cpu",
) -> DenoisePlan:
    """A request's arguments, with the defaults of its mode filled in, as one denoise over `unet_config`.

    `scheduler_config` is the model's, with any per-request overrides already applied.
    """
    if mode is Mode.TEXT2IMG and (strength is not None or denoising_start is not None):
        raise ValueError("`strength` and `denoising_start` need an image to start from (img2img or inpaint)")
    if mode is Mode.IMG2IMG and is_inpainting_unet(unet_config.in_channels):
        raise ValueError("an inpainting UNet (9 input channels) needs a mask: use inpainting")
    strength = strength_for(mode, strength)
    check_range(strength, denoising_start, denoising_end)
    steps = NUM_INFERENCE_STEPS if num_inference_steps is None else num_inference_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {steps!r}")
    schedule = make_schedule(scheduler or SCHEDULER, steps, scheduler_config, device)
    if denoising_start is not None:
        start = start_index(schedule, denoising_start)
    elif strength is not None:
        start = strength_start_index(schedule, steps, strength)
    else:
        start = 0
    return DenoisePlan(
        mode, schedule, start, end_index(schedule, denoising_end, start),
        guidance_scale_for(mode, guidance_scale), guidance_rescale,
        add_noise=denoising_start is None, from_noise=from_pure_noise(mode, strength, denoising_start))
