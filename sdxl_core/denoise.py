"""Denoise a range of a schedule with classifier-free guidance: the loop every pipeline and service runs.

Follows the denoising loop of diffusers 0.42.1 pipelines/stable_diffusion_xl/
pipeline_stable_diffusion_xl.py (and _img2img.py, the same loop): CFG on a [negative, positive]
batch, guidance_rescale, then the sampler's step. All request state is local to the call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sdxl_core.conditioning import add_time_ids
from sdxl_core.configs import UNetConfig
from sdxl_core.noise import GeneratorLike
from sdxl_core.prompts import PromptEmbeddings
from sdxl_core.schedulers.base import Schedule

Size = Sequence[float]  # (height, width) in pixels, or (top, left) for crops
OnStep = Callable[[int, int, torch.Tensor], bool | None]


class DenoisingCancelled(Exception):
    """`on_step` returned False: the run stopped after `steps_done` steps, at `latents`."""

    def __init__(self, steps_done: int, latents: torch.Tensor):
        super().__init__(f"denoising cancelled by on_step after {steps_done} step(s)")
        self.steps_done = steps_done
        self.latents = latents


@dataclass(frozen=True)
class Conditioning:
    """What the UNet sees besides latents and timestep; the negatives are None without guidance."""

    prompt_embeds: torch.Tensor  # (B, 77, D)
    pooled_prompt_embeds: torch.Tensor  # (B, P)
    add_time_ids: torch.Tensor  # (B, 6) base-type, (B, 5) refiner-type
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    negative_add_time_ids: torch.Tensor | None = None

    @classmethod
    def from_prompt(
        cls, embeddings: PromptEmbeddings, time_ids: torch.Tensor, negative_time_ids: torch.Tensor
    ) -> Conditioning:
        """Prompt embeddings plus one row of time ids (1, N) each, repeated over the batch."""
        e = embeddings
        B, like = e.prompt_embeds.shape[0], e.prompt_embeds

        def rows(ids: torch.Tensor) -> torch.Tensor:
            return ids.to(like.device, like.dtype).reshape(1, -1).repeat(B, 1)

        guided = e.negative_prompt_embeds is not None
        return cls(
            e.prompt_embeds, e.pooled_prompt_embeds, rows(time_ids),
            e.negative_prompt_embeds, e.negative_pooled_prompt_embeds, rows(negative_time_ids) if guided else None,
        )

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def unet_inputs(self, guided: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context, pooled, time_ids), as [negative, positive] batches of 2B when guided."""
        positive = (self.prompt_embeds, self.pooled_prompt_embeds, self.add_time_ids)
        if not guided:
            return positive
        if self.negative_prompt_embeds is None:
            raise ValueError(
                "guidance_scale > 1 needs negative embeddings: encode the prompt with do_classifier_free_guidance=True"
            )
        negative = (self.negative_prompt_embeds, self.negative_pooled_prompt_embeds, self.negative_add_time_ids)
        return tuple(torch.cat([n, p]) for n, p in zip(negative, positive))


def text2img_time_ids(
    config: UNetConfig,
    original_size: Size,
    crops_coords_top_left: Size,
    target_size: Size,
    negative_original_size: Size | None = None,
    negative_crops_coords_top_left: Size = (0, 0),
    negative_target_size: Size | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(time_ids, negative_time_ids), each (1, 6), as StableDiffusionXLPipeline builds them.

    The negative ids differ only when both negative_original_size and negative_target_size are given.
    """
    ids = add_time_ids(config, original_size, crops_coords_top_left, target_size)
    if negative_original_size is None or negative_target_size is None:
        return ids, ids
    return ids, add_time_ids(config, negative_original_size, negative_crops_coords_top_left, negative_target_size)


def img2img_time_ids(
    config: UNetConfig,
    original_size: Size,
    crops_coords_top_left: Size,
    target_size: Size,
    negative_original_size: Size | None = None,
    negative_crops_coords_top_left: Size = (0, 0),
    negative_target_size: Size | None = None,
    *,
    aesthetic_score: float,
    negative_aesthetic_score: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(time_ids, negative_time_ids), each (1, 5|6), as StableDiffusionXLImg2ImgPipeline._get_add_time_ids.

    Refiner-type UNets take the aesthetic scores; base-type UNets take target sizes, and there
    diffusers builds the negative ids with the *positive* crops_coords_top_left (kept for parity).
    """
    negative_original_size = negative_original_size or original_size
    negative_target_size = negative_target_size or target_size
    if config.requires_aesthetics_score:
        ids = add_time_ids(config, original_size, crops_coords_top_left, aesthetic_score=aesthetic_score)
        negative = add_time_ids(
            config, negative_original_size, negative_crops_coords_top_left, aesthetic_score=negative_aesthetic_score)
    else:
        ids = add_time_ids(config, original_size, crops_coords_top_left, target_size)
        negative = add_time_ids(config, negative_original_size, crops_coords_top_left, negative_target_size)
    return ids, negative


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Match the guided prediction's per-sample std to the text one's, then mix (Lin et al. 2023, sec. 3.4)."""
    dims = list(range(1, noise_cfg.ndim))
    rescaled = noise_cfg * (noise_pred_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def guide(noise_pred: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) on a [negative, positive] batch of predictions."""
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    guided = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    if guidance_rescale > 0.0:
        guided = rescale_noise_cfg(guided, noise_pred_text, guidance_rescale)
    return guided


@dataclass(frozen=True)
class UNetInputs:
    """One UNet evaluation's rows: what `unet(*inputs)` takes. Rows of several runs concatenate into one forward."""

    sample: torch.Tensor  # (R, C, h, w), scaled for the step (and with mask and masked image: 9 channels)
    timestep: torch.Tensor  # (R,)
    context: torch.Tensor  # (R, L, D)
    pooled: torch.Tensor  # (R, P)
    time_ids: torch.Tensor  # (R, 5|6)

    def __iter__(self):
        return iter((self.sample, self.timestep, self.context, self.pooled, self.time_ids))

    @property
    def rows(self) -> int:
        return self.sample.shape[0]

    @classmethod
    def cat(cls, parts: Sequence[UNetInputs]) -> UNetInputs:
        """Several runs' rows as one forward's (all of one latent size and context length)."""
        return cls(*(torch.cat(tensors) for tensors in zip(*parts)))


class Denoising:
    """One run of steps [start, end) of a schedule on latents (B, 4, h, w), one UNet evaluation at a time: whoever
    holds the UNet calls `unet(*run.unet_inputs())` and hands the output to `advance`. `denoise` drives one run
    alone; a serving engine packs the rows of many runs, each at its own step, into one forward.

    Guidance applies when guidance_scale > 1. `state` carries the sampler's multistep history (a fresh dict
    starts afresh). With `inpaint`, a 9-channel UNet (`inpainting_unet`) sees the mask and masked image's latents
    on its input channels; with a 4-channel UNet the known region is put back after each step, noised to the next
    step's level (clean after the last). After each step `on_step(step, total, latents)` gets the 0-based step
    within the run and the run's step count; returning False raises DenoisingCancelled.
    """

    def __init__(
        self, schedule: Schedule, latents: torch.Tensor, conditioning: Conditioning, start: int = 0,
        end: int | None = None, guidance_scale: float = 5.0, guidance_rescale: float = 0.0,
        generator: GeneratorLike = None, *, inpaint=None, inpainting_unet: bool = False, state: dict | None = None,
        on_step: OnStep | None = None,
    ):
        end = schedule.num_steps if end is None else end
        if not 0 <= start <= end <= schedule.num_steps:
            raise ValueError(f"the range [{start}, {end}) must lie within the schedule's {schedule.num_steps} steps")
        if latents.shape[0] != conditioning.batch_size:
            raise ValueError(f"latents have batch size {latents.shape[0]}, the conditioning "
                             f"{conditioning.batch_size}; they must match")
        self.schedule, self.latents, self.start, self.end, self.step = schedule, latents, start, end, start
        self.guidance_scale, self.guidance_rescale, self.generator = guidance_scale, guidance_rescale, generator
        self.guided = guidance_scale > 1
        self.context, self.pooled, self.time_ids = conditioning.unet_inputs(self.guided)
        self.inpaint, self.state, self.on_step = inpaint, {} if state is None else state, on_step
        self.extra = None  # (B, 5, h, w): a 9-channel UNet's [mask | masked image latents]
        if inpaint is not None and inpainting_unet:
            if inpaint.masked_image_latents is None:
                raise ValueError("an inpainting UNet needs the masked image: pass an image in pixels, "
                                 "or `masked_image_latents` with image latents")
            self.extra = torch.cat([inpaint.mask, inpaint.masked_image_latents], dim=1)

    @property
    def done(self) -> bool:
        return self.step >= self.end

    @property
    def rows(self) -> int:
        """Rows of each UNet evaluation: two per image with guidance ([negative, positive])."""
        return self.context.shape[0]

    def unet_inputs(self) -> UNetInputs:
        """The UNet's rows for the next step."""
        x = torch.cat([self.latents] * 2) if self.guided else self.latents
        x = self.schedule.sampler.scale_model_input(self.schedule, x, self.step)
        if self.extra is not None:
            x = torch.cat([x, self.extra.repeat(x.shape[0] // self.extra.shape[0], 1, 1, 1)], dim=1)
        timestep = self.schedule.timesteps[self.step].reshape(1).expand(x.shape[0])
        return UNetInputs(x, timestep, self.context, self.pooled, self.time_ids)

    def advance(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """Take the UNet's output for this step's rows: guidance, the sampler's step, inpainting's blend."""
        i, schedule = self.step, self.schedule
        if self.guided:
            noise_pred = guide(noise_pred, self.guidance_scale, self.guidance_rescale)
        latents = schedule.sampler.step(schedule, i, self.latents, noise_pred, self.state, self.generator)
        if self.inpaint is not None and self.extra is None:
            known = self.inpaint.image_latents
            if i + 1 < self.end:
                known = schedule.sampler.add_noise(schedule, known, self.inpaint.noise, i + 1)
            latents = (1 - self.inpaint.mask) * known + self.inpaint.mask * latents
        self.latents, self.step = latents, i + 1
        if self.on_step is not None and self.on_step(i - self.start, self.end - self.start, latents) is False:
            raise DenoisingCancelled(i - self.start + 1, latents)
        return latents

    @torch.no_grad()
    def run(self, unet: torch.nn.Module) -> torch.Tensor:
        """Every remaining step, alone."""
        while not self.done:
            self.advance(unet(*self.unet_inputs()))
        return self.latents


def denoise(
    unet: torch.nn.Module,
    schedule: Schedule,
    latents: torch.Tensor,
    conditioning: Conditioning,
    start: int = 0,
    end: int | None = None,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.0,
    generator: GeneratorLike = None,
    state: dict | None = None,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Run steps [start, end) of `schedule` on latents (B, 4, H/8, W/8) in the UNet's space (see Denoising)."""
    return Denoising(schedule, latents, conditioning, start, end, guidance_scale, guidance_rescale, generator,
                     state=state, on_step=on_step).run(unet)
