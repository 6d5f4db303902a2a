"""SDXL text-to-image: encode prompt -> text2img_denoise (from noise) -> decode -> watermark -> postprocess.

Arguments and results follow diffusers 0.42.1 StableDiffusionXLPipeline
(pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py).
"""

from __future__ import annotations

import torch

from sdxl_core.denoise import OnStep, Size
from sdxl_core.latents import VAE_SCALE_FACTOR, check_output_type
from sdxl_core.noise import GeneratorLike
from sdxl_core.pipelines.common import PipelineBase, SDXLPipelineOutput, check_size, resolve_generator
from sdxl_core.pipelines.lora import with_loras
from sdxl_core.prompts import Prompt
from sdxl_core.request import (
    GUIDANCE_SCALE,
    NUM_INFERENCE_STEPS,
    SCHEDULER,
    MicroConditioning,
    Mode,
    is_inpainting_unet,
)
from sdxl_core.stages import text2img_denoise


class SDXLPipeline(PipelineBase):
    """Text-to-image with the SDXL base; `denoising_end` hands the rest of the schedule to a refiner."""

    def __init__(self, unet, *args, **kwargs):
        if unet.config.requires_aesthetics_score or is_inpainting_unet(unet.config.in_channels):
            raise ValueError("SDXLPipeline needs a base UNet; use SDXLImg2ImgPipeline for the refiner, "
                             "SDXLInpaintPipeline for an inpainting model")
        super().__init__(unet, *args, **kwargs)

    @torch.no_grad()
    @with_loras
    def __call__(
        self,
        prompt: Prompt,
        prompt_2: Prompt | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = NUM_INFERENCE_STEPS,
        denoising_end: float | None = None,
        guidance_scale: float = GUIDANCE_SCALE[Mode.TEXT2IMG],
        negative_prompt: Prompt | None = None,
        negative_prompt_2: Prompt | None = None,
        num_images_per_prompt: int = 1,
        generator: GeneratorLike = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size = (0, 0),
        negative_target_size: Size | None = None,
        scheduler: str = SCHEDULER,
        on_step: OnStep | None = None,
        prompt_syntax: str = "plain",
    ) -> SDXLPipelineOutput:
        """Generate images; `seed` (int) is shorthand for generator=torch.Generator("cpu").manual_seed(seed)."""
        height, width = height or self.default_size, width or self.default_size
        check_size("height", height)
        check_size("width", width)
        check_output_type(output_type)
        plan = self.plan(Mode.TEXT2IMG, num_inference_steps, scheduler, guidance_scale, guidance_rescale,
                         denoising_end=denoising_end)
        generator = resolve_generator(generator, seed)
        embeddings = self.encode_prompt(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, plan.guided, prompt_syntax)
        micro = MicroConditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                                  negative_crops_coords_top_left, negative_target_size)
        latent_size = (height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
        return self.finish(text2img_denoise, plan, embeddings, micro, (height, width), generator, output_type,
                           on_step, latents=latents, latent_size=latent_size)
