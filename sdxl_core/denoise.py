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


@torch.no_grad()
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
    """Run steps [start, end) of `schedule` on latents (B, 4, H/8, W/8) in the UNet's space.

    Guidance applies when guidance_scale > 1. `state` carries the sampler's multistep
    history: pass the same dict to continue one run across calls; None starts afresh.
    After each step, `on_step(step, total, latents)` gets the 0-based step within this
    call and the call's step count; returning False raises DenoisingCancelled.
    """
    end = schedule.num_steps if end is None else end
    if not 0 <= start <= end <= schedule.num_steps:
        raise ValueError(f"the range [{start}, {end}) must lie within the schedule's {schedule.num_steps} steps")
    if latents.shape[0] != conditioning.batch_size:
        raise ValueError(
            f"latents have batch size {latents.shape[0]}, the conditioning {conditioning.batch_size}; they must match")
    sampler, state = schedule.sampler, {} if state is None else state
    guided = guidance_scale > 1
    context, pooled, time_ids = conditioning.unet_inputs(guided)
    for i in range(start, end):
        x = torch.cat([latents] * 2) if guided else latents
        x = sampler.scale_model_input(schedule, x, i)
        noise_pred = unet(x, schedule.timesteps[i], context, pooled, time_ids)
        if guided:
            noise_pred = guide(noise_pred, guidance_scale, guidance_rescale)
        latents = sampler.step(schedule, i, latents, noise_pred, state, generator)
        if on_step is not None and on_step(i - start, end - start, latents) is False:
            raise DenoisingCancelled(i - start + 1, latents)
    return latents
