"""SDXL inpainting: encode prompt -> encode_inpaint_stage -> inpaint_denoise -> decode.

Arguments and results follow diffusers 0.42.1 StableDiffusionXLInpaintPipeline
(pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_inpaint.py), without padding_mask_crop.
"""

from __future__ import annotations

import torch

from sdxl_core.denoise import OnStep, Size
from sdxl_core.latents import check_output_type, preprocess_image
from sdxl_core.masks import check_mask_matches, image_size, is_latents, preprocess_mask
from sdxl_core.noise import GeneratorLike
from sdxl_core.pipelines.common import PipelineBase, SDXLPipelineOutput, check_size, resolve_generator
from sdxl_core.pipelines.lora import with_loras
from sdxl_core.prompts import Prompt
from sdxl_core.request import (
    AESTHETIC_SCORE,
    GUIDANCE_SCALE,
    INPAINTING_IN_CHANNELS,
    LATENT_CHANNELS,
    NEGATIVE_AESTHETIC_SCORE,
    NUM_INFERENCE_STEPS,
    SCHEDULER,
    STRENGTH,
    MicroConditioning,
    Mode,
    is_inpainting_unet,
)
from sdxl_core.stages import encode_inpaint_stage, fork, inpaint_denoise


class SDXLInpaintPipeline(PipelineBase):
    """Inpainting with a 4-channel SDXL base or refiner (known region blended back each step),
    or a 9-channel inpainting UNet (mask and masked image as extra input channels)."""

    def __init__(self, unet, *args, **kwargs):
        if unet.config.in_channels not in (LATENT_CHANNELS, INPAINTING_IN_CHANNELS):
            raise ValueError(f"SDXLInpaintPipeline needs a UNet with 4 or 9 input channels, "
                             f"got {unet.config.in_channels}")
        super().__init__(unet, *args, **kwargs)

    def _size(self, image, height: int | None, width: int | None) -> tuple[int, int]:
        """diffusers' default is the UNet's sample size; image latents fix it to 8x theirs."""
        if not is_latents(image):
            return height or self.default_size, width or self.default_size
        size = image_size(image)
        if (height or size[0], width or size[1]) != size:
            raise ValueError(f"`image` is latents of {size[0]}x{size[1]} pixels; "
                             f"height x width {height}x{width} must match or be left out")
        return size

    @torch.no_grad()
    @with_loras
    def __call__(
        self,
        prompt: Prompt,
        prompt_2: Prompt | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = STRENGTH[Mode.INPAINT],
        num_inference_steps: int = NUM_INFERENCE_STEPS,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = GUIDANCE_SCALE[Mode.INPAINT],
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
        """Repaint where `mask_image` is white (>= 0.5) in `image` (PIL / array / tensor in [0, 1], or
        latents (B, 4, h, w) from a base with output_type="latent", then with `denoising_start`).

        Both are resized to height x width (default: the UNet's sample size * 8, as diffusers).
        Runs the last `int(num_inference_steps * strength)` steps; strength 1 starts from pure noise.
        """
        if image is None or mask_image is None:
            raise ValueError("`image` and `mask_image` are both required")
        check_mask_matches(image, mask_image)
        check_output_type(output_type)
        plan = self.plan(Mode.INPAINT, num_inference_steps, scheduler, guidance_scale, guidance_rescale,
                         strength=strength, denoising_start=denoising_start, denoising_end=denoising_end)
        generator = resolve_generator(generator, seed)
        height, width = self._size(image, height, width)
        check_size("height", height)
        check_size("width", width)
        init_image = preprocess_image(image, height, width).float()  # (N, 3, H, W) in [-1, 1], or latents
        mask = preprocess_mask(mask_image, height, width)  # (M, 1, H, W)

        embeddings = self.encode_prompt(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, plan.guided, prompt_syntax)
        in_channels = self.unet.config.in_channels
        # Each side starts from the same generator state, as the VAE and denoiser stages start from the seed.
        encoded = encode_inpaint_stage(
            self.vae, init_image, mask, embeddings.prompt_embeds.shape[0], fork(generator), self.device,
            self.unet.dtype, encode_image=plan.needs_image_latents(in_channels),
            masked_image_latents=is_inpainting_unet(in_channels), given_masked_image_latents=masked_image_latents)
        micro = MicroConditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                                  negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                                  negative_aesthetic_score)
        return self.finish(inpaint_denoise, plan, embeddings, micro, (height, width), generator, output_type,
                           on_step, image=encoded)
