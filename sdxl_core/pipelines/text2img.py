"""SDXL text-to-image: encode prompt -> denoise_stage (from noise) -> decode -> watermark -> postprocess.

Arguments and results follow diffusers 0.42.1 StableDiffusionXLPipeline
(pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py).
"""

from __future__ import annotations

import torch

from sdxl_core.denoise import Conditioning, OnStep, Size, text2img_time_ids
from sdxl_core.noise import GeneratorLike
from sdxl_core.pipelines.common import PipelineBase, SDXLPipelineOutput, check_common, check_size, resolve_generator
from sdxl_core.prompts import Prompt
from sdxl_core.ranges import check_fraction
from sdxl_core.schedulers import make_schedule
from sdxl_core.stages import denoise_range, denoise_stage


class SDXLPipeline(PipelineBase):
    """Text-to-image with the SDXL base; `denoising_end` hands the rest of the schedule to a refiner."""

    def __init__(self, unet, *args, **kwargs):
        if unet.config.requires_aesthetics_score or unet.config.in_channels != 4:
            raise ValueError("SDXLPipeline needs a base UNet; use SDXLImg2ImgPipeline for the refiner, "
                             "SDXLInpaintPipeline for an inpainting model")
        super().__init__(unet, *args, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompt,
        prompt_2: Prompt | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
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
        scheduler: str = "euler",
        on_step: OnStep | None = None,
    ) -> SDXLPipelineOutput:
        """Generate images; `seed` (int) is shorthand for generator=torch.Generator("cpu").manual_seed(seed)."""
        height, width = height or self.default_size, width or self.default_size
        check_size("height", height)
        check_size("width", width)
        check_common(num_inference_steps, output_type)
        check_fraction("denoising_end", denoising_end)
        generator = resolve_generator(generator, seed)
        guided = guidance_scale > 1

        embeddings = self.encode_prompt(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, guided)
        time_ids = text2img_time_ids(
            self.unet.config, original_size or (height, width), crops_coords_top_left, target_size or (height, width),
            negative_original_size, negative_crops_coords_top_left, negative_target_size)
        conditioning = Conditioning.from_prompt(embeddings, *time_ids)

        schedule = make_schedule(scheduler, num_inference_steps, self.scheduler_config, self.device)
        start, end = denoise_range(schedule, num_inference_steps, denoising_end=denoising_end)
        latents = denoise_stage(
            self.unet, schedule, conditioning, start, end, guidance_scale, guidance_rescale, generator,
            self.device, self.unet.dtype, latents=latents, latent_size=(height // 8, width // 8), on_step=on_step)
        return SDXLPipelineOutput(self.decode(latents, output_type))
