"""SDXL image-to-image, and the refiner: encode prompt -> encode_image_stage -> img2img_denoise -> decode.

Arguments and results follow diffusers 0.42.1 StableDiffusionXLImg2ImgPipeline
(pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py).
"""

from __future__ import annotations

import torch

from sdxl_core.denoise import OnStep, Size
from sdxl_core.latents import VAE_SCALE_FACTOR, check_output_type, preprocess_image
from sdxl_core.noise import GeneratorLike
from sdxl_core.pipelines.common import PipelineBase, SDXLPipelineOutput, resolve_generator
from sdxl_core.pipelines.lora import with_loras
from sdxl_core.prompts import Prompt
from sdxl_core.request import (
    AESTHETIC_SCORE,
    GUIDANCE_SCALE,
    NEGATIVE_AESTHETIC_SCORE,
    NUM_INFERENCE_STEPS,
    SCHEDULER,
    STRENGTH,
    MicroConditioning,
    Mode,
    is_inpainting_unet,
)
from sdxl_core.stages import encode_image_stage, fork, img2img_denoise


class SDXLImg2ImgPipeline(PipelineBase):
    """Image-to-image with an SDXL base or refiner; `denoising_start` takes over a base's latents."""

    def __init__(self, unet, *args, **kwargs):
        if is_inpainting_unet(unet.config.in_channels):
            raise ValueError("SDXLImg2ImgPipeline needs a base or refiner UNet; use SDXLInpaintPipeline for an "
                             "inpainting model")
        super().__init__(unet, *args, **kwargs)

    @torch.no_grad()
    @with_loras
    def __call__(
        self,
        prompt: Prompt,
        prompt_2: Prompt | None = None,
        image=None,
        strength: float = STRENGTH[Mode.IMG2IMG],
        num_inference_steps: int = NUM_INFERENCE_STEPS,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = GUIDANCE_SCALE[Mode.IMG2IMG],
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
        aesthetic_score: float = AESTHETIC_SCORE,
        negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE,
        scheduler: str = SCHEDULER,
        on_step: OnStep | None = None,
        prompt_syntax: str = "plain",
    ) -> SDXLPipelineOutput:
        """Denoise `image` (PIL / array / tensor in [0, 1], or latents (B, 4, h, w) from a base).

        Runs the last `int(num_inference_steps * strength)` steps on the noised image, or, with
        `denoising_start`, the steps after that fraction on the image latents as given (no noise).
        """
        if image is None:
            raise ValueError("`image` is required: an image, or latents from a base with output_type='latent'")
        check_output_type(output_type)
        plan = self.plan(Mode.IMG2IMG, num_inference_steps, scheduler, guidance_scale, guidance_rescale,
                         strength=strength, denoising_start=denoising_start, denoising_end=denoising_end)
        generator = resolve_generator(generator, seed)
        embeddings = self.encode_prompt(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, plan.guided, prompt_syntax)
        # Each side starts from the same generator state, as the VAE and denoiser stages start from the seed.
        encoded = encode_image_stage(self.vae, preprocess_image(image), embeddings.prompt_embeds.shape[0], fork(generator),
                                     self.device, self.unet.dtype)
        size = tuple(VAE_SCALE_FACTOR * s for s in encoded.image_latents.shape[-2:])
        micro = MicroConditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                                  negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                                  negative_aesthetic_score)
        return self.finish(img2img_denoise, plan, embeddings, micro, size, generator, output_type, on_step,
                           image=encoded)
