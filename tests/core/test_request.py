"""Request semantics: the defaults are diffusers' own, and the rules plan a denoise as the pipelines run it."""

import dataclasses
import inspect

import pytest
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from sdxl_core.configs import TINY_BASE_UNET, UNetConfig
from sdxl_core.request import (
    AESTHETIC_SCORE,
    GUIDANCE_SCALE,
    NEGATIVE_AESTHETIC_SCORE,
    NUM_INFERENCE_STEPS,
    STRENGTH,
    Mode,
    from_pure_noise,
    needs_image_latents,
    plan_denoise,
)

DIFFUSERS = {Mode.TEXT2IMG: StableDiffusionXLPipeline, Mode.IMG2IMG: StableDiffusionXLImg2ImgPipeline,
             Mode.INPAINT: StableDiffusionXLInpaintPipeline}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1}


def _default(mode: Mode, name: str):
    return inspect.signature(DIFFUSERS[mode].__call__).parameters[name].default


@pytest.mark.parametrize("mode", list(Mode))
def test_defaults_are_the_diffusers_pipelines_defaults(mode):
    assert GUIDANCE_SCALE[mode] == _default(mode, "guidance_scale")
    assert NUM_INFERENCE_STEPS == _default(mode, "num_inference_steps")
    if mode is not Mode.TEXT2IMG:
        assert STRENGTH[mode] == _default(mode, "strength")
        assert (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE) == (_default(mode, "aesthetic_score"),
                                                               _default(mode, "negative_aesthetic_score"))


def _unet(in_channels: int = 4) -> UNetConfig:
    return dataclasses.replace(TINY_BASE_UNET, in_channels=in_channels)


def test_only_inpainting_at_strength_1_without_a_start_is_pure_noise():
    assert from_pure_noise(Mode.INPAINT, 1.0, None)
    assert not from_pure_noise(Mode.INPAINT, STRENGTH[Mode.INPAINT], None)
    assert not from_pure_noise(Mode.INPAINT, 1.0, 0.5)
    assert not from_pure_noise(Mode.IMG2IMG, 1.0, None)


def test_only_a_9_channel_unet_from_pure_noise_does_without_image_latents():
    assert not needs_image_latents(9, from_noise=True)
    assert needs_image_latents(4, from_noise=True)
    assert needs_image_latents(9, from_noise=False)


def test_a_plan_fills_in_its_modes_defaults():
    inpaint = plan_denoise(_unet(), SCHEDULER_CONFIG, Mode.INPAINT)
    assert (inpaint.guidance_scale, inpaint.schedule.num_steps, inpaint.add_noise) == (7.5, 50, True)
    assert inpaint.start == 1 and not inpaint.from_noise  # the last int(50 * 0.9999) = 49 steps
    img2img = plan_denoise(_unet(), SCHEDULER_CONFIG, Mode.IMG2IMG, num_inference_steps=10)
    assert (img2img.start, img2img.end, img2img.guidance_scale) == (7, 10, 5.0)  # the last int(10 * 0.3) steps


def test_a_denoising_start_takes_the_image_as_it_is():
    plan = plan_denoise(_unet(), SCHEDULER_CONFIG, Mode.IMG2IMG, num_inference_steps=10, denoising_start=0.8)
    assert (plan.start, plan.end, plan.add_noise, plan.from_noise) == (8, 10, False, False)


@pytest.mark.parametrize("mode, args, field", [
    (Mode.TEXT2IMG, {"strength": 0.5}, "strength"),
    (Mode.IMG2IMG, {"denoising_start": 0.8, "denoising_end": 0.5}, "denoising_start"),
    (Mode.IMG2IMG, {"num_inference_steps": 0}, "num_inference_steps"),
    (Mode.INPAINT, {"strength": 1.5}, "strength"),
])
def test_bad_arguments_name_the_field(mode, args, field):
    with pytest.raises(ValueError, match=field):
        plan_denoise(_unet(), SCHEDULER_CONFIG, mode, **args)


def test_img2img_on_an_inpainting_unet_is_refused():
    with pytest.raises(ValueError, match="inpainting"):
        plan_denoise(_unet(9), SCHEDULER_CONFIG, Mode.IMG2IMG)
