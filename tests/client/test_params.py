import pytest
from PIL import Image

from sdxl.v1 import orchestrator_pb2
from sdxl_client.params import generate_params, requests
from sdxl_wire import images

_OPTIONAL = ("guidance_scale", "seed", "denoising_start", "denoising_end", "strength", "high_noise_frac",
             "refiner_strength")
_MICRO = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
          "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score", "negative_aesthetic_score")


def test_a_str_prompt_is_one_prompt_not_its_characters():
    params = generate_params("a cat", prompt_2="bigG", negative_prompt="blurry")
    assert list(params.prompt) == ["a cat"]
    assert list(params.prompt_2) == ["bigG"] and list(params.negative_prompt) == ["blurry"]
    assert list(generate_params(["a", "b"]).prompt) == ["a", "b"]
    assert list(params.negative_prompt_2) == []


def test_empty_and_non_string_prompts_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        generate_params([])
    with pytest.raises(TypeError, match="list of str"):
        generate_params([1])


@pytest.mark.parametrize(
    "has_image, has_mask, mode",
    [(False, False, orchestrator_pb2.MODE_TEXT2IMG), (True, False, orchestrator_pb2.MODE_IMG2IMG),
     (True, True, orchestrator_pb2.MODE_INPAINT)],
)
def test_mode_is_inferred_from_image_and_mask(has_image, has_mask, mode):
    assert generate_params("p", has_image=has_image, has_mask=has_mask).mode == mode


def test_a_mask_without_an_image_is_refused():
    with pytest.raises(ValueError, match="mask_image needs image"):
        generate_params("p", has_mask=True)


@pytest.mark.parametrize(
    "refiner, enum",
    [("none", orchestrator_pb2.REFINER_NONE), ("ensemble", orchestrator_pb2.REFINER_ENSEMBLE),
     ("refine", orchestrator_pb2.REFINER_REFINE), (orchestrator_pb2.REFINER_REFINE, orchestrator_pb2.REFINER_REFINE)],
)
def test_refiner_names_map_to_the_enum(refiner, enum):
    assert generate_params("p", refiner=refiner).refiner == enum


def test_an_unknown_refiner_is_refused():
    with pytest.raises(ValueError, match="ensemble"):
        generate_params("p", refiner="both")


def test_unset_optionals_stay_unset_so_the_server_applies_its_defaults():
    params = generate_params("p")
    for name in _OPTIONAL:
        assert not params.HasField(name), name
    for name in _MICRO:
        assert not params.micro_conditioning.HasField(name), name
    assert (params.height, params.width, params.num_inference_steps, params.scheduler) == (0, 0, 0, "")
    assert params.num_images_per_prompt == 0 and not params.HasField("watermark")
    assert not params.HasField("scheduler_options")


def test_given_values_are_sent():
    params = generate_params(
        "p", guidance_scale=7.0, seed=0, denoising_end=0.7, strength=0.5, height=512, width=768,
        original_size=(1024, 2048), crops_coords_top_left=(3, 4), aesthetic_score=7.5, watermark=False,
        refiner="refine", refiner_strength=0.2, scheduler="dpmpp_2m", scheduler_options={"use_karras_sigmas": True},
        num_images_per_prompt=2,
    )
    assert params.guidance_scale == 7.0 and params.HasField("seed") and params.seed == 0
    assert params.denoising_end == pytest.approx(0.7) and params.strength == 0.5
    assert (params.height, params.width, params.num_images_per_prompt) == (512, 768, 2)
    mc = params.micro_conditioning
    assert (mc.original_size.height, mc.original_size.width) == (1024, 2048)
    assert (mc.crops_coords_top_left.top, mc.crops_coords_top_left.left) == (3, 4)
    assert mc.aesthetic_score == 7.5 and not mc.HasField("negative_aesthetic_score")
    assert params.HasField("watermark") and params.watermark is False
    assert params.refiner_strength == pytest.approx(0.2) and not params.HasField("high_noise_frac")
    assert params.scheduler_options["use_karras_sigmas"] is True


def test_high_noise_frac_is_sent_only_when_given():
    assert not generate_params("p", refiner="ensemble").HasField("high_noise_frac")
    assert generate_params("p", refiner="ensemble", high_noise_frac=0.7).high_noise_frac == pytest.approx(0.7)


def test_negative_seeds_are_refused():
    with pytest.raises(ValueError, match="seed"):
        generate_params("p", seed=-1)


def test_request_stream_is_params_then_images_then_masks():
    png = images.to_png(Image.new("RGB", (8, 8)))
    stream = list(requests(generate_params("p"), [png, png], [png], chunk_bytes=32))
    kinds = [r.WhichOneof("payload") for r in stream]
    assert kinds[0] == "params" and kinds.count("params") == 1
    assert kinds.index("mask_image") > max(i for i, k in enumerate(kinds) if k == "image")
    assert {r.image.index for r in stream if r.WhichOneof("payload") == "image"} == {0, 1}


def test_priority_is_sent_by_name():
    from sdxl.v1 import stage_pb2

    assert generate_params("p", priority="interactive").priority == stage_pb2.PRIORITY_INTERACTIVE
    assert generate_params("p").priority == stage_pb2.PRIORITY_UNSPECIFIED
    with pytest.raises(ValueError, match="priority"):
        generate_params("p", priority="urgent")


@pytest.mark.parametrize("syntax, wire", [(None, ""), ("plain", "plain"), ("compel", "compel")])
def test_prompt_syntax_goes_on_the_wire_and_unset_leaves_the_servers_default(syntax, wire):
    assert generate_params("a (cat)1.3", prompt_syntax=syntax).prompt_syntax == wire


def test_an_unknown_prompt_syntax_is_refused_before_sending():
    with pytest.raises(ValueError, match="prompt_syntax must be one of"):
        generate_params("p", prompt_syntax="a1111")


def test_loras_go_on_the_wire_by_name_with_their_weights():
    params = generate_params("p", loras={"pixel": 0.5, "papercut": None}, refiner_loras=["refined"])
    assert [(a.name, a.weight if a.HasField("weight") else None) for a in params.loras] == [("pixel", 0.5),
                                                                                             ("papercut", None)]
    assert [(a.name, a.HasField("weight")) for a in params.refiner_loras] == [("refined", False)]
    assert list(generate_params("p").loras) == []
    for bad, message in (("pixel", "got the string"), ({"": 1.0}, "non-empty strings"), ({"a": "1"}, "a number")):
        with pytest.raises(ValueError, match=message):
            generate_params("p", loras=bad)
