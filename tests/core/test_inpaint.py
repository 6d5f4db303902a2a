"""SDXLInpaintPipeline against diffusers' StableDiffusionXLInpaintPipeline on the same tiny folders, fp32."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.image_processor import VaeImageProcessor

from sdxl_core import SDXLInpaintPipeline
from sdxl_core.denoise import DenoisingCancelled
from sdxl_core.masks import preprocess_mask
from tests.oracle import DIFFUSERS_SCHEDULERS

TOL = 1e-4
PROMPT = "a red fox in the snow"
SCHEDULERS = ["dpmpp_2m", "euler", "euler_a"]


def load_theirs(folder, **components):
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(folder, add_watermarker=False, **components)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler_config = pipe.scheduler.config
    return pipe


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return SDXLInpaintPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)


@pytest.fixture(scope="module")
def refiner(tiny_model_dir, base):
    return SDXLInpaintPipeline.from_pretrained(
        tiny_model_dir / "refiner", add_watermarker=False, text_encoder_2=base.text_encoder_2, vae=base.vae)


@pytest.fixture(scope="module")
def inpainting(tiny_model_dir):
    return SDXLInpaintPipeline.from_pretrained(tiny_model_dir / "inpainting", add_watermarker=False)


@pytest.fixture(scope="module")
def theirs_base(tiny_model_dir):
    return load_theirs(tiny_model_dir / "base")


@pytest.fixture(scope="module")
def theirs_refiner(tiny_model_dir, theirs_base):
    return load_theirs(tiny_model_dir / "refiner", text_encoder_2=theirs_base.text_encoder_2, vae=theirs_base.vae)


@pytest.fixture(scope="module")
def theirs_inpainting(tiny_model_dir):
    return load_theirs(tiny_model_dir / "inpainting")


@pytest.fixture(scope="module")
def image():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mask():
    m = np.zeros((64, 64), dtype=np.uint8)
    m[16:48, 8:40] = 255  # repaint a 32x32 block, keep the rest
    m[14:16, 8:40], m[49:51, 8:40] = 127, 128  # soft edges, either side of the 0.5 threshold
    return PIL.Image.fromarray(m)


def run_theirs(pipe, scheduler, seed, **kwargs):
    cls, overrides = DIFFUSERS_SCHEDULERS[scheduler]
    pipe.scheduler = cls.from_config(pipe.model_scheduler_config, **overrides)
    generator = [torch.Generator("cpu").manual_seed(s) for s in seed] if isinstance(seed, list) else \
        torch.Generator("cpu").manual_seed(seed)
    return pipe(generator=generator, **kwargs).images


def run_ours(pipe, scheduler, seed, **kwargs):
    if isinstance(seed, list):
        return pipe(scheduler=scheduler, generator=[torch.Generator("cpu").manual_seed(s) for s in seed],
                    **kwargs).images
    return pipe(scheduler=scheduler, seed=seed, **kwargs).images


def max_diff(a, b) -> float:
    a, b = (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (a, b))
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def both(ours, theirs, image, mask, scheduler="euler", seed=0, **kwargs):
    kwargs = {"prompt": PROMPT, "image": image, "mask_image": mask, "num_inference_steps": 5,
              "output_type": "np"} | kwargs
    return run_ours(ours, scheduler, seed, **kwargs), run_theirs(theirs, scheduler, seed, **kwargs)


RNG, TORCH_RNG = np.random.default_rng(2), torch.Generator().manual_seed(2)
MASK_INPUTS = {
    "pil_rgb_resized": PIL.Image.fromarray(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8)),
    "array_hw": RNG.uniform(size=(48, 64)),
    "array_hw1": RNG.uniform(size=(40, 40, 1)),
    "array_bhw": RNG.uniform(size=(3, 48, 64)),
    "tensor_hw": torch.rand(40, 40, generator=TORCH_RNG),
    "tensor_bhw": torch.rand(3, 48, 64, generator=TORCH_RNG),
    "tensor_b1hw": torch.rand(2, 1, 48, 64, generator=TORCH_RNG),
    "list_of_tensors": [torch.rand(1, 48, 64, generator=TORCH_RNG), torch.rand(1, 48, 64, generator=TORCH_RNG)],
}


@pytest.mark.parametrize("name", MASK_INPUTS)
def test_mask_preprocessing_matches_diffusers_mask_processor(name):
    mask_processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    expected = mask_processor.preprocess(MASK_INPUTS[name], height=48, width=64)
    actual = preprocess_mask(MASK_INPUTS[name], 48, 64)
    assert actual.shape == expected.shape and actual.shape[1:] == (1, 48, 64)
    assert torch.equal(actual, expected.float())


@pytest.mark.parametrize("strength", [0.8, 1.0])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_base_unet_blends_known_region_as_diffusers(base, theirs_base, image, mask, scheduler, strength):
    actual, expected = both(base, theirs_base, image, mask, scheduler, seed=7, strength=strength)
    assert actual.shape == (1, 64, 64, 3)
    assert max_diff(actual, expected) <= TOL


@pytest.mark.parametrize("strength", [0.8, 1.0])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpainting_unet_matches_diffusers(inpainting, theirs_inpainting, image, mask, scheduler, strength):
    actual, expected = both(inpainting, theirs_inpainting, image, mask, scheduler, seed=3, strength=strength)
    assert max_diff(actual, expected) <= TOL


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_base_to_refiner_handoff_matches_diffusers(base, refiner, theirs_base, theirs_refiner, image, mask, scheduler):
    # The diffusers docs' flow: the base stops at 0.7 and hands latents to the refiner, both inpainting.
    kwargs = {"prompt": PROMPT, "mask_image": mask, "num_inference_steps": 6}
    ours_latents = run_ours(base, scheduler, 5, image=image, denoising_end=0.7, output_type="latent", **kwargs)
    theirs_latents = run_theirs(theirs_base, scheduler, 5, image=image, denoising_end=0.7, output_type="latent",
                                **kwargs)
    assert ours_latents.shape == (1, 4, 8, 8)
    assert max_diff(ours_latents, theirs_latents) <= TOL

    actual = run_ours(refiner, scheduler, 6, image=theirs_latents, denoising_start=0.7, output_type="np", **kwargs)
    expected = run_theirs(theirs_refiner, scheduler, 6, image=theirs_latents, denoising_start=0.7,
                          output_type="np", **kwargs)
    assert max_diff(actual, expected) <= TOL


def test_batch_with_generator_list_array_mask_and_guidance_options(
    inpainting, theirs_inpainting, image, mask,
):
    # Two prompts x two images each, one generator per image; a noisy float array mask; CFG options.
    soft_mask = np.random.default_rng(1).uniform(size=(64, 64)).astype(np.float32)
    actual, expected = both(
        inpainting, theirs_inpainting, image, soft_mask, "euler_a", seed=[1, 2, 3, 4],
        prompt=[PROMPT, "a blue house"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2,
        guidance_scale=6.0, guidance_rescale=0.7, num_inference_steps=4, strength=0.9)
    assert actual.shape == (4, 64, 64, 3)
    assert max_diff(actual, expected) <= TOL


def test_given_masked_image_latents_are_used_as_diffusers_uses_them(inpainting, theirs_inpainting, image, mask):
    masked_image_latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    tensor_mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None]  # (1, H, W)
    actual, expected = both(inpainting, theirs_inpainting, image, tensor_mask, seed=4,
                            masked_image_latents=masked_image_latents)
    assert max_diff(actual, expected) <= TOL


def test_known_region_stays_the_image_latents(base, image, mask):
    # After the last step a 4-channel UNet's output equals the clean image latents wherever mask is 0.
    steps = []
    latents = base(PROMPT, image=image, mask_image=mask, num_inference_steps=4, strength=1.0, seed=0,
                   output_type="latent", on_step=lambda i, n, x: steps.append((i, n))).images
    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    keep[..., 2:6, 1:5] = False  # the mask's 32x32 block, at latent size
    reference = base(PROMPT, image=image, mask_image=PIL.Image.new("L", (64, 64)), num_inference_steps=4,
                     strength=1.0, seed=0, output_type="latent").images  # nothing to repaint
    assert steps == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert torch.equal(latents * keep, reference * keep)
    assert not torch.allclose(latents, reference)


def test_on_step_false_cancels(base, image, mask):
    with pytest.raises(DenoisingCancelled) as cancelled:
        base(PROMPT, image=image, mask_image=mask, num_inference_steps=4, seed=0, on_step=lambda i, n, x: i < 1)
    assert cancelled.value.steps_done == 2


def test_mask_of_another_size_is_rejected_naming_both_sizes(base, image):
    with pytest.raises(ValueError, match=r"64x64.*48x56"):
        base(PROMPT, image=image, mask_image=PIL.Image.new("L", (56, 48)), num_inference_steps=2)


def test_inpainting_unet_needs_the_masked_image(inpainting, mask):
    with pytest.raises(ValueError, match="masked_image_latents"):
        inpainting(PROMPT, image=torch.zeros(1, 4, 8, 8), mask_image=mask, num_inference_steps=2,
                   denoising_start=0.5)
