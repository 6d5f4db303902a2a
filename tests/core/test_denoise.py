"""The stage functions under the pipelines: ranges, time ids, guidance, the denoise loop, image pre/postprocessing."""

from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg as their_rescale

from sdxl_core.configs import SDXL_SCHEDULER_CONFIG, TINY_BASE_UNET, TINY_REFINER_UNET
from sdxl_core.denoise import (
    Conditioning,
    DenoisingCancelled,
    denoise,
    guide,
    img2img_time_ids,
    rescale_noise_cfg,
    text2img_time_ids,
)
from sdxl_core.latents import postprocess, preprocess_image, preview, tile
from sdxl_core.loading import load_components
from sdxl_core.prompts import PromptEmbeddings
from sdxl_core.ranges import end_index, start_index, strength_start_index
from sdxl_core.schedulers import SCHEDULERS, make_schedule
from tests.oracle import DIFFUSERS_SCHEDULERS

NAMES = sorted(SCHEDULERS)


def their_scheduler(name, steps):
    cls, overrides = DIFFUSERS_SCHEDULERS[name]
    scheduler = cls.from_config(dict(SDXL_SCHEDULER_CONFIG), **overrides)
    scheduler.set_timesteps(steps)
    return scheduler


# --- ranges: denoising_end, denoising_start, strength


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [1, 4, 7, 10, 25, 50])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.7, 0.8, 0.85, 0.999])
def test_handoff_ranges_match_diffusers(name, steps, fraction):
    theirs = their_scheduler(name, steps)
    schedule = make_schedule(name, steps)
    assert torch.equal(schedule.timesteps, theirs.timesteps.to(schedule.timesteps.dtype))
    # StableDiffusionXLPipeline.__call__ keeps the timesteps >= the cutoff
    cutoff = round(1000 - fraction * 1000)
    kept = [t for t in theirs.timesteps if t >= cutoff]
    assert end_index(schedule, fraction) == len(kept)
    # StableDiffusionXLImg2ImgPipeline.get_timesteps with denoising_start
    rest, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=theirs), steps, 0.3, "cpu",
                                                             denoising_start=fraction)
    start = start_index(schedule, fraction)
    assert torch.equal(schedule.timesteps[start:], rest.to(schedule.timesteps.dtype))
    if hasattr(theirs, "set_begin_index"):
        assert theirs.begin_index == start


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("steps,strength", [(10, 0.3), (50, 0.3), (7, 0.5), (4, 1.0), (3, 0.34)])
def test_strength_start_matches_diffusers(name, steps, strength):
    theirs = their_scheduler(name, steps)
    rest, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=theirs), steps, strength, "cpu")
    schedule = make_schedule(name, steps)
    start = strength_start_index(schedule, steps, strength)
    assert torch.equal(schedule.timesteps[start:], rest.to(schedule.timesteps.dtype))


def test_denoising_end_after_a_start_counts_from_the_start():
    schedule = make_schedule("euler", 10)  # 901, 801, ..., 1
    start = strength_start_index(schedule, 10, 0.9)  # 801
    assert end_index(schedule, 0.5, start) == 5  # 801, 701, 601, 501 are >= 500


# --- time ids, as diffusers' _get_add_time_ids builds them


def _stub_pipeline(config, requires_aesthetics_score):
    """Just what _get_add_time_ids reads from a diffusers pipeline."""
    in_features = config.projection_class_embeddings_input_dim
    unet = SimpleNamespace(config=SimpleNamespace(addition_time_embed_dim=config.addition_time_embed_dim),
                           add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=in_features)))
    return SimpleNamespace(unet=unet, config=SimpleNamespace(requires_aesthetics_score=requires_aesthetics_score))


SIZES = dict(original_size=(96, 128), crops_coords_top_left=(8, 16), target_size=(64, 80),
             negative_original_size=(32, 48), negative_crops_coords_top_left=(4, 2), negative_target_size=(40, 56))


@pytest.mark.parametrize("config", [TINY_BASE_UNET, TINY_REFINER_UNET], ids=["base", "refiner"])
def test_img2img_time_ids_match_diffusers_including_the_positive_crops_quirk(config):
    stub = _stub_pipeline(config, config.requires_aesthetics_score)
    s = SIZES
    expected = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        stub, s["original_size"], s["crops_coords_top_left"], s["target_size"], 7.0, 1.5, s["negative_original_size"],
        s["negative_crops_coords_top_left"], s["negative_target_size"], torch.float32, config.pooled_projection_dim)
    actual = img2img_time_ids(config, **SIZES, aesthetic_score=7.0, negative_aesthetic_score=1.5)
    for ours, theirs in zip(actual, expected):
        assert torch.equal(ours, theirs)
    if not config.requires_aesthetics_score:  # negative crops are ignored by the base-type ids
        assert actual[1][0, 2:4].tolist() == [8.0, 16.0]


def test_text2img_time_ids_match_diffusers():
    stub = _stub_pipeline(TINY_BASE_UNET, False)
    for sizes in [(SIZES["original_size"], SIZES["crops_coords_top_left"], SIZES["target_size"]),
                  (SIZES["negative_original_size"], SIZES["negative_crops_coords_top_left"],
                   SIZES["negative_target_size"])]:
        expected = StableDiffusionXLPipeline._get_add_time_ids(stub, *sizes, torch.float32, TINY_BASE_UNET.pooled_projection_dim)
        assert torch.equal(text2img_time_ids(TINY_BASE_UNET, *sizes)[0], expected)
    ids, negative = text2img_time_ids(TINY_BASE_UNET, *list(SIZES.values())[:4])  # no negative_target_size
    assert torch.equal(ids, negative)


# --- guidance


def test_rescale_noise_cfg_matches_diffusers():
    g = torch.Generator().manual_seed(0)
    cfg, text = torch.randn(3, 4, 8, 8, generator=g), 2 * torch.randn(3, 4, 8, 8, generator=g)
    assert torch.allclose(rescale_noise_cfg(cfg, text, 0.7), their_rescale(cfg, text, guidance_rescale=0.7))


def test_guide_takes_negative_first_and_rescale_only_when_positive():
    uncond, text = torch.full((1, 4, 2, 2), 1.0), torch.arange(16.0).reshape(1, 4, 2, 2)
    batch = torch.cat([uncond, text])
    assert torch.equal(guide(batch, 3.0), uncond + 3.0 * (text - uncond))
    assert torch.allclose(guide(batch, 3.0, 0.5), rescale_noise_cfg(guide(batch, 3.0), text, 0.5))


def _embeddings(batch=2, guided=True, seed=0):
    g, c = torch.Generator().manual_seed(seed), TINY_BASE_UNET
    shapes = [(batch, 77, c.cross_attention_dim), (batch, c.pooled_projection_dim)] * (2 if guided else 1)
    return PromptEmbeddings(*(torch.randn(shape, generator=g) for shape in shapes))


def test_conditioning_batches_negative_then_positive_with_time_ids_per_row():
    ids, negative_ids = text2img_time_ids(TINY_BASE_UNET, (64, 64), (0, 0), (64, 64), (32, 32), (0, 0), (32, 32))
    conditioning = Conditioning.from_prompt(_embeddings(), ids, negative_ids)
    context, _, time_ids = conditioning.unet_inputs(guided=True)
    assert torch.equal(context, torch.cat([conditioning.negative_prompt_embeds, conditioning.prompt_embeds]))
    assert time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2 + [[64, 64, 0, 0, 64, 64]] * 2
    assert conditioning.unet_inputs(guided=False)[2].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    with pytest.raises(ValueError, match="negative"):
        Conditioning.from_prompt(_embeddings(guided=False), ids, ids).unet_inputs(guided=True)


# --- the denoise loop, on the tiny base UNet


@pytest.fixture(scope="module")
def unet(tiny_model_dir):
    return load_components(tiny_model_dir / "base").unet


def _inputs(batch=1, seed=0):
    ids = text2img_time_ids(TINY_BASE_UNET, (64, 64), (0, 0), (64, 64))
    conditioning = Conditioning.from_prompt(_embeddings(batch, seed=seed), *ids)
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed)), conditioning


@pytest.mark.parametrize("name", NAMES)
def test_a_run_split_in_two_with_one_state_equals_the_whole_run(unet, name):
    schedule = make_schedule(name, 6)
    latents, conditioning = _inputs()
    latents = latents * schedule.init_noise_sigma
    whole = denoise(unet, schedule, latents, conditioning, generator=torch.Generator().manual_seed(1))
    state, g = {}, torch.Generator().manual_seed(1)
    half = denoise(unet, schedule, latents, conditioning, 0, 3, generator=g, state=state)
    rest = denoise(unet, schedule, half, conditioning, 3, generator=g, state=state)
    assert torch.equal(whole, rest)


def test_samples_of_a_batch_denoise_as_they_do_alone(unet):
    schedule = make_schedule("dpmpp_2m", 4)
    latents, conditioning = _inputs(batch=2)
    batched = denoise(unet, schedule, latents, conditioning)
    for i in range(2):
        one = Conditioning(*(t[i : i + 1] for t in vars(conditioning).values()))
        alone = denoise(unet, schedule, latents[i : i + 1], one)
        assert float((alone - batched[i : i + 1]).abs().max()) <= 1e-4


def test_on_step_counts_within_the_range_and_false_cancels(unet):
    schedule = make_schedule("euler", 8)
    latents, conditioning = _inputs()
    calls = []
    denoise(unet, schedule, latents, conditioning, 5, 8, on_step=lambda *a: calls.append(a[:2]))
    assert calls == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(DenoisingCancelled) as info:
        denoise(unet, schedule, latents, conditioning, 2, 8, on_step=lambda step, total, x: step != 3)
    assert info.value.steps_done == 4
    expected = denoise(unet, schedule, latents, conditioning, 2, 6)
    assert torch.equal(info.value.latents, expected)


@pytest.mark.parametrize("start,end", [(-1, 4), (3, 2), (0, 9)])
def test_denoise_rejects_a_range_outside_the_schedule(unet, start, end):
    latents, conditioning = _inputs()
    with pytest.raises(ValueError, match=r"range"):
        denoise(unet, make_schedule("euler", 8), latents, conditioning, start, end)


def test_denoise_rejects_latents_of_another_batch_size(unet):
    latents, conditioning = _inputs(batch=2)
    with pytest.raises(ValueError, match="batch size 1"):
        denoise(unet, make_schedule("euler", 2), latents[:1], conditioning)


# --- images in and out, as diffusers' VaeImageProcessor


def _pil(h, w, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


IMAGES = {
    "pil": lambda: _pil(64, 64),
    "pil_resized_down_to_multiple_of_8": lambda: _pil(70, 45),
    "pil_list": lambda: [_pil(48, 40, 1), _pil(48, 40, 2)],
    "numpy_hwc": lambda: np.random.default_rng(3).random((61, 80, 3), dtype=np.float32),
    "numpy_batch": lambda: np.random.default_rng(4).random((2, 64, 72, 3), dtype=np.float32),
    "tensor_chw": lambda: torch.rand(3, 67, 64, generator=torch.Generator().manual_seed(5)),
    "tensor_minus_one_to_one": lambda: torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1,
    "latents": lambda: torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("make", IMAGES.values(), ids=IMAGES.keys())
def test_preprocess_image_matches_vae_image_processor(make):
    expected = VaeImageProcessor(vae_scale_factor=8).preprocess(make())
    actual = preprocess_image(make())
    assert actual.shape == expected.shape
    assert torch.allclose(actual.float(), expected.float(), atol=1e-6)


@pytest.mark.parametrize("output_type", ["pt", "np", "pil"])
def test_postprocess_matches_vae_image_processor(output_type):
    images = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(8))  # some outside [-1, 1]
    expected = VaeImageProcessor(vae_scale_factor=8).postprocess(images, output_type=output_type)
    actual = postprocess(images, output_type)
    if output_type == "pil":
        assert all(np.array_equal(np.asarray(a), np.asarray(e)) for a, e in zip(actual, expected, strict=True))
    else:
        assert np.array_equal(np.asarray(actual), np.asarray(expected))


def test_image_latents_are_tiled_over_the_batch_as_diffusers():
    latents = torch.randn(2, 4, 8, 8)
    assert torch.equal(tile(latents, 4, "image"), torch.cat([latents, latents]))  # (a, b, a, b), as diffusers
    with pytest.raises(ValueError, match="3"):
        tile(latents, 3, "image")


def test_preview_maps_each_latent_pixel_to_one_rgb_pixel():
    latents = torch.zeros(1, 4, 6, 10)
    latents[0, :, 2, 3] = torch.tensor([2.0, -1.0, 0.5, 0.0])
    image = preview(latents)
    assert image.shape == (1, 6, 10, 3) and image.dtype == torch.uint8
    changed = (image != image[0, 0, 0]).any(-1)
    assert changed.nonzero().tolist() == [[0, 2, 3]]
