"""SDXL inpainting: encode prompt -> encode_inpaint_stage -> denoise_stage -> decode.

Arguments and results follow diffusers 0.42.1 StableDiffusionXLInpaintPipeline
(pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_inpaint.py), without padding_mask_crop.
"""

from __future__ import annotations

import torch

from sdxl_core.denoise import Conditioning, OnStep, Size, img2img_time_ids
from sdxl_core.latents import preprocess_image
from sdxl_core.masks import check_mask_matches, image_size, is_latents, preprocess_mask
from sdxl_core.noise import GeneratorLike
from sdxl_core.pipelines.common import PipelineBase, SDXLPipelineOutput, check_common, check_size, resolve_generator
from sdxl_core.prompts import Prompt
from sdxl_core.ranges import check_range
from sdxl_core.schedulers import make_schedule
from sdxl_core.stages import denoise_range, denoise_stage, encode_inpaint_stage, fork


class SDXLInpaintPipeline(PipelineBase):
    """Inpainting with a 4-channel SDXL base or refiner (known region blended back each step),
    or a 9-channel inpainting UNet (mask and masked image as extra input channels)."""

    def __init__(self, unet, *args, **kwargs):
        if unet.config.in_channels not in (4, 9):
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
    def __call__(
        self,
        prompt: Prompt,
        prompt_2: Prompt | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
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
        """Repaint where `mask_image` is white (>= 0.5) in `image` (PIL / array / tensor in [0, 1], or
        latents (B, 4, h, w) from a base with output_type="latent", then with `denoising_start`).

        Both are resized to height x width (default: the UNet's sample size * 8, as diffusers).
        Runs the last `int(num_inference_steps * strength)` steps; strength 1 starts from pure noise.
        """
        if image is None or mask_image is None:
            raise ValueError("`image` and `mask_image` are both required")
        check_mask_matches(image, mask_image)
        check_common(num_inference_steps, output_type)
        check_range(strength, denoising_start, denoising_end)
        generator = resolve_generator(generator, seed)
        guided = guidance_scale > 1

        height, width = self._size(image, height, width)
        check_size("height", height)
        check_size("width", width)
        init_image = preprocess_image(image, height, width).float()  # (N, 3, H, W) in [-1, 1], or latents
        mask = preprocess_mask(mask_image, height, width)  # (M, 1, H, W)

        embeddings = self.encode_prompt(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, guided)
        batch_size, dtype = embeddings.prompt_embeds.shape[0], self.unet.dtype
        schedule = make_schedule(scheduler, num_inference_steps, self.scheduler_config, self.device)
        start, end = denoise_range(schedule, num_inference_steps, denoising_start, denoising_end, strength)
        from_noise = strength == 1.0
        # Each side starts from the same generator state, as the VAE and denoiser stages start from the seed.
        encoded = encode_inpaint_stage(
            self.vae, init_image, mask, batch_size, fork(generator), self.device, dtype,
            encode_image=self.unet.config.in_channels == 4 or not from_noise or denoising_start is not None,
            masked_image_latents=self.unet.config.in_channels != 4, given_masked_image_latents=masked_image_latents)

        time_ids = img2img_time_ids(
            self.unet.config, original_size or (height, width), crops_coords_top_left, target_size or (height, width),
            negative_original_size, negative_crops_coords_top_left, negative_target_size,
            aesthetic_score, negative_aesthetic_score)
        conditioning = Conditioning.from_prompt(embeddings, *time_ids)
        latents = denoise_stage(
            self.unet, schedule, conditioning, start, end, guidance_scale, guidance_rescale, generator,
            self.device, dtype, image=encoded, add_noise=denoising_start is None, from_noise=from_noise,
            on_step=on_step)
        return SDXLPipelineOutput(self.decode(latents, output_type))
