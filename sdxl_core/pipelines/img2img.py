"""SDXL image-to-image, and the refiner: encode prompt -> encode_image_stage -> denoise_stage -> decode.

Arguments and results follow diffusers 0.42.1 StableDiffusionXLImg2ImgPipeline
(pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py).
"""

from __future__ import annotations

import torch

from sdxl_core.denoise import Conditioning, OnStep, Size, img2img_time_ids
from sdxl_core.latents import VAE_SCALE_FACTOR, preprocess_image
from sdxl_core.noise import GeneratorLike
from sdxl_core.pipelines.common import PipelineBase, SDXLPipelineOutput, check_common, resolve_generator
from sdxl_core.prompts import Prompt
from sdxl_core.ranges import check_range
from sdxl_core.schedulers import make_schedule
from sdxl_core.stages import denoise_range, denoise_stage, encode_image_stage, fork


class SDXLImg2ImgPipeline(PipelineBase):
    """Image-to-image with an SDXL base or refiner; `denoising_start` takes over a base's latents."""

    def __init__(self, unet, *args, **kwargs):
        if unet.config.in_channels != 4:
            raise ValueError("SDXLImg2ImgPipeline needs a base or refiner UNet; use SDXLInpaintPipeline for an "
                             "inpainting model")
        super().__init__(unet, *args, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompt,
        prompt_2: Prompt | None = None,
        image=None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: Prompt | None = None,
        negative_prompt_2: Prompt | None = None,
        num_images_per_prompt: int = 1,
        generator: GeneratorLike = None,
        seed: int | None = None,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size = (0, 0),
        negative_target_size: Size | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        scheduler: str = "euler",
        on_step: OnStep | None = None,
    ) -> SDXLPipelineOutput:
        """Denoise `image` (PIL / array / tensor in [0, 1], or latents (B, 4, h, w) from a base).

        Runs the last `int(num_inference_steps * strength)` steps on the noised image, or, with
        `denoising_start`, the steps after that fraction on the image latents as given (no noise).
        """
        if image is None:
            raise ValueError("`image` is required: an image, or latents from a base with output_type='latent'")
        check_common(num_inference_steps, output_type)
        check_range(strength, denoising_start, denoising_end)
        generator = resolve_generator(generator, seed)
        guided = guidance_scale > 1

        embeddings = self.encode_prompt(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, guided)
        schedule = make_schedule(scheduler, num_inference_steps, self.scheduler_config, self.device)
        batch_size = embeddings.prompt_embeds.shape[0]
        # Each side starts from the same generator state, as the VAE and denoiser stages start from the seed.
        encoded = encode_image_stage(
            self.vae, preprocess_image(image), batch_size, fork(generator), self.device, self.unet.dtype)
        start, end = denoise_range(schedule, num_inference_steps, denoising_start, denoising_end, strength)

        height, width = (VAE_SCALE_FACTOR * s for s in encoded.image_latents.shape[-2:])
        time_ids = img2img_time_ids(
            self.unet.config, original_size or (height, width), crops_coords_top_left, target_size or (height, width),
            negative_original_size, negative_crops_coords_top_left, negative_target_size,
            aesthetic_score, negative_aesthetic_score)
        conditioning = Conditioning.from_prompt(embeddings, *time_ids)
        latents = denoise_stage(
            self.unet, schedule, conditioning, start, end, guidance_scale, guidance_rescale, generator,
            self.device, self.unet.dtype, image=encoded, add_noise=denoising_start is None, on_step=on_step)
        return SDXLPipelineOutput(self.decode(latents, output_type))
