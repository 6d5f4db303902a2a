"""The SDXL UNet against diffusers' UNet2DConditionModel with identical weights."""

import copy
import json
from functools import cache
from types import SimpleNamespace

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from sdxl_core.conditioning import add_time_ids
from sdxl_core.configs import (
    SDXL_BASE_UNET,
    SDXL_INPAINT_UNET,
    SDXL_REFINER_UNET,
    TINY_BASE_UNET,
    TINY_INPAINT_UNET,
    TINY_REFINER_UNET,
    UNetConfig,
)
from sdxl_core.unet import UNet
from tests.oracle import REFERENCE_DIR as REFERENCE

TOL = 1e-5


@cache
def models(cfg: UNetConfig) -> tuple[UNet2DConditionModel, UNet]:
    """diffusers' model with random weights (norm affines too) and ours loaded strictly from its state dict."""
    torch.manual_seed(1234)
    theirs = UNet2DConditionModel.from_config(cfg.to_diffusers()).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:  # defaults are 1 and 0; perturb them so a swapped or skipped norm shows
                p.add_(0.1 * torch.randn_like(p))
    ours = UNet(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def make_inputs(cfg: UNetConfig, batch: int, h: int, w: int):
    """Random latents (B, C, h, w), context, pooled and the time ids of an (8h, 8w) image."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    last = {"aesthetic_score": 6.0} if cfg.requires_aesthetics_score else {"target_size": (8 * h, 8 * w)}
    ids = add_time_ids(cfg, (8 * h, 8 * w), (0, 0), batch_size=batch, **last)
    return sample, context, pooled, ids


@torch.no_grad()
def run_both(cfg, timestep, sample, context, pooled, ids):
    theirs, ours = models(cfg)
    expected = theirs(sample, timestep, encoder_hidden_states=context,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    return expected, ours(sample, timestep, context, pooled, ids)


def max_diff(a, b):
    return (a - b).abs().max().item()


CONFIGS = {"base": TINY_BASE_UNET, "refiner": TINY_REFINER_UNET, "inpaint": TINY_INPAINT_UNET}


@pytest.mark.parametrize("name,h,w", [
    ("base", 8, 8), ("base", 48, 80), ("base", 24, 40), ("base", 80, 48),
    ("refiner", 16, 16), ("refiner", 48, 80), ("refiner", 24, 40),
    ("inpaint", 16, 16), ("inpaint", 48, 80),
])
def test_matches_diffusers_at_sizes_and_aspect_ratios(name, h, w):
    cfg = CONFIGS[name]
    expected, actual = run_both(cfg, torch.tensor([999, 500]), *make_inputs(cfg, 2, h, w))
    assert actual.shape == expected.shape == (2, cfg.out_channels, h, w)
    assert max_diff(actual, expected) <= TOL


@pytest.mark.parametrize("name,h,w", [("base", 13, 21), ("refiner", 20, 36)])
def test_matches_diffusers_when_size_is_not_a_multiple_of_the_downscale(name, h, w):
    # diffusers then forwards upsample_size so each upsample lands on its skip's odd size.
    cfg = CONFIGS[name]
    expected, actual = run_both(cfg, 400, *make_inputs(cfg, 1, h, w))
    assert actual.shape == expected.shape == (1, cfg.out_channels, h, w)
    assert max_diff(actual, expected) <= TOL


@pytest.mark.parametrize("timestep", [999, 500.5, torch.tensor(10), torch.tensor([10]), torch.tensor([10.0, 10.0])])
def test_timestep_forms_match_diffusers(timestep):
    cfg = TINY_BASE_UNET
    expected, actual = run_both(cfg, timestep, *make_inputs(cfg, 2, 16, 16))
    assert max_diff(actual, expected) <= TOL


def test_half_precision_matches_diffusers():
    # Pins the dtype handling: float32 sinusoidal features cast to the sample dtype, as diffusers.
    cfg = TINY_REFINER_UNET
    theirs, ours = (copy.deepcopy(m).half() for m in models(cfg))
    sample, context, pooled, ids = (x.half() for x in make_inputs(cfg, 2, 8, 16))
    with torch.no_grad():
        expected = theirs(sample, torch.tensor([999, 10]), encoder_hidden_states=context,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        actual = ours(sample, torch.tensor([999, 10]), context, pooled, ids)
    assert actual.dtype == torch.float16
    assert max_diff(actual.float(), expected.float()) <= 1e-3

@pytest.mark.parametrize("name", ["base", "refiner"])
def test_mixed_per_sample_timesteps_equal_running_each_sample_alone(name):
    cfg = CONFIGS[name]
    sample, context, pooled, ids = inputs = make_inputs(cfg, 2, 16, 24)
    timesteps = torch.tensor([999, 10])
    expected, batched = run_both(cfg, timesteps, *inputs)
    assert max_diff(batched, expected) <= TOL
    _, ours = models(cfg)
    with torch.no_grad():
        for i in range(2):
            one = slice(i, i + 1)
            alone = ours(sample[one], timesteps[i], context[one], pooled[one], ids[one])
            assert max_diff(alone, batched[one]) <= TOL
    assert max_diff(batched[0], batched[1]) > 1e-3  # the two timesteps really give different outputs


def test_original_size_changes_the_output():
    cfg = TINY_BASE_UNET
    sample, context, pooled, _ = make_inputs(cfg, 1, 16, 16)
    _, ours = models(cfg)
    with torch.no_grad():
        outs = [ours(sample, 500, context, pooled, add_time_ids(cfg, size, (0, 0), (128, 128)))
                for size in [(128, 128), (512, 256)]]
    assert max_diff(*outs) > 1e-3


def test_aesthetic_score_changes_the_refiner_output():
    cfg = TINY_REFINER_UNET
    sample, context, pooled, _ = make_inputs(cfg, 1, 16, 16)
    _, ours = models(cfg)
    with torch.no_grad():
        outs = [ours(sample, 500, context, pooled, add_time_ids(cfg, (128, 128), (0, 0), aesthetic_score=score))
                for score in [6.0, 2.5]]
    assert max_diff(*outs) > 1e-3


def test_unet_rejects_time_ids_of_the_other_model_type():
    cfg = TINY_BASE_UNET
    sample, context, pooled, _ = make_inputs(cfg, 1, 8, 8)
    refiner_ids = add_time_ids(TINY_REFINER_UNET, (64, 64), (0, 0), aesthetic_score=6.0)
    with pytest.raises(ValueError, match="time_ids"):
        models(cfg)[1](sample, 1, context, pooled, refiner_ids)


# --- add_time_ids --------------------------------------------------------------------


def test_add_time_ids_matches_diffusers_base_pipeline():
    cfg = TINY_BASE_UNET
    pipe = SimpleNamespace(unet=models(cfg)[0])  # diffusers checks the length against add_embedding
    expected = StableDiffusionXLPipeline._get_add_time_ids(
        pipe, (1024, 768), (16, 32), (896, 640), dtype=torch.float16,
        text_encoder_projection_dim=cfg.pooled_projection_dim)
    actual = add_time_ids(cfg, (1024, 768), (16, 32), (896, 640), batch_size=3, dtype=torch.float16)
    assert actual.dtype == torch.float16
    assert torch.equal(actual, expected.repeat(3, 1))


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_add_time_ids_matches_diffusers_img2img_pipeline(name):
    cfg = CONFIGS[name]
    pipe = SimpleNamespace(unet=models(cfg)[0], config=SimpleNamespace(requires_aesthetics_score=cfg.num_time_ids == 5))
    expected, expected_negative = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        pipe, (1024, 768), (16, 32), (896, 640), 6.0, 2.5, (512, 384), (0, 0), (448, 320),
        dtype=torch.float32, text_encoder_projection_dim=cfg.pooled_projection_dim)
    if cfg.requires_aesthetics_score:
        actual = add_time_ids(cfg, (1024, 768), (16, 32), aesthetic_score=6.0)
        negative = add_time_ids(cfg, (512, 384), (0, 0), aesthetic_score=2.5)
    else:
        actual = add_time_ids(cfg, (1024, 768), (16, 32), (896, 640))
        # diffusers builds the base's negative ids with the positive crops_coords_top_left.
        negative = add_time_ids(cfg, (512, 384), (16, 32), (448, 320))
    assert torch.equal(actual, expected)
    assert torch.equal(negative, expected_negative)


@pytest.mark.parametrize("cfg,kwargs,argument", [
    (TINY_BASE_UNET, {"target_size": (64, 64), "aesthetic_score": 6.0}, "aesthetic_score"),
    (TINY_BASE_UNET, {}, "target_size"),
    (TINY_REFINER_UNET, {"target_size": (64, 64), "aesthetic_score": 6.0}, "target_size"),
    (TINY_REFINER_UNET, {}, "aesthetic_score"),
])
def test_add_time_ids_rejects_arguments_of_the_other_model_type(cfg, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        add_time_ids(cfg, (64, 64), (0, 0), **kwargs)


def test_add_time_ids_rejects_a_size_that_is_not_a_pair():
    with pytest.raises(ValueError, match="original_size"):
        add_time_ids(TINY_BASE_UNET, (64, 64, 3), (0, 0), (64, 64))


# --- full size, on the meta device ------------------------------------------------------


def diffusers_on_meta(name: str, **overrides) -> UNet2DConditionModel:
    with open(f"{REFERENCE}/{name}/unet/config.json", encoding="utf-8") as f:
        config = {**json.load(f), **overrides}
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def count(model):
    return sum(p.numel() for p in model.parameters())


BASE_PARAMETERS = 2_567_463_684
# Inpainting widens conv_in from 4 to 9 input channels: 320 outputs x 5 channels x 3x3 kernel more.
INPAINT_PARAMETERS = BASE_PARAMETERS + 320 * (9 - 4) * 3 * 3


@pytest.mark.parametrize("cfg,reference,overrides,parameters", [
    (SDXL_BASE_UNET, "base", {}, BASE_PARAMETERS),
    (SDXL_REFINER_UNET, "refiner", {}, 2_259_526_660),
    (SDXL_INPAINT_UNET, "base", {"in_channels": 9}, INPAINT_PARAMETERS),
])
def test_full_size_state_dict_and_parameter_count_match_diffusers(cfg, reference, overrides, parameters):
    with torch.device("meta"):
        ours = UNet(cfg)
    theirs = diffusers_on_meta(reference, **overrides)
    assert shapes(ours) == shapes(theirs)
    assert count(ours) == count(theirs) == parameters

