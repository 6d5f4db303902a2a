"""Model CPU offload: accelerate's hooks chained in request order, images unchanged."""

import numpy as np
import pytest
import torch

from sdxl_core import SDXLImg2ImgPipeline, SDXLPipeline

KWARGS = {"prompt": "a lighthouse", "num_inference_steps": 3, "output_type": "np", "seed": 1}


@pytest.fixture
def fresh(tiny_model_dir):
    return lambda cls=SDXLPipeline, model="base": cls.from_pretrained(tiny_model_dir / model, add_watermarker=False)


def record(pipe) -> list[str]:
    """Log each model's hook firing ("on:unet") and each hook's offload ("off:unet")."""
    log = []
    names = {id(getattr(pipe, n)): n for n in ("text_encoder", "text_encoder_2", "unet", "vae") if getattr(pipe, n)}
    for user_hook in pipe._offload_hooks:
        name, hook = names[id(user_hook.model)], user_hook.hook
        pre_forward, offload = hook.pre_forward, user_hook.offload

        def on(module, *args, _name=name, _pre=pre_forward, **kwargs):
            log.append(f"on:{_name}")
            return _pre(module, *args, **kwargs)

        def off(_name=name, _offload=offload):
            log.append(f"off:{_name}")
            _offload()

        hook.pre_forward, user_hook.offload = on, off
    return log


def test_offloaded_pipeline_gives_the_images_of_the_plain_one(fresh):
    expected = fresh()(**KWARGS).images
    pipe = fresh().enable_model_cpu_offload("cpu")
    np.testing.assert_array_equal(pipe(**KWARGS).images, expected)


def test_hooks_chain_in_request_order_fire_for_each_stage_and_release_all_at_the_end(fresh):
    pipe = fresh().enable_model_cpu_offload("cpu")
    hooks = pipe._offload_hooks
    # Each model's hook sends the previous model back to the CPU when it starts.
    assert [h.model for h in hooks] == [pipe.text_encoder, pipe.text_encoder_2, pipe.unet, pipe.vae]
    assert [h.hook.prev_module_hook for h in hooks] == [None, *hooks[:-1]]
    log = record(pipe)
    pipe(**KWARGS)
    fired = [entry for entry in log if entry.startswith("on:")]
    # One text-encoder pass each, a UNet call per step (CFG in one batch), and the VAE decode,
    # which is not a forward: it fires only through the VAE's explicit onload.
    assert fired == ["on:text_encoder", "on:text_encoder_2", *["on:unet"] * 3, "on:vae"]
    assert log[-4:] == ["off:text_encoder", "off:text_encoder_2", "off:unet", "off:vae"]


def test_img2img_vae_encode_fires_the_vae_hook_before_the_unet(fresh):
    pipe = fresh(SDXLImg2ImgPipeline, "refiner").enable_model_cpu_offload("cpu")
    assert pipe.text_encoder is None and len(pipe._offload_hooks) == 3
    log = record(pipe)
    pipe(prompt="x", image=torch.rand(1, 3, 64, 64), strength=0.5, num_inference_steps=4, output_type="np", seed=0)
    fired = [entry for entry in log if entry.startswith("on:")]
    # The refiner encodes its empty negative prompt (force_zeros_for_empty_prompt is false there).
    assert fired == ["on:text_encoder_2"] * 2 + ["on:vae", "on:unet", "on:unet", "on:vae"]


def test_offload_device_is_where_request_tensors_live(fresh):
    pipe = fresh()
    assert pipe.device == torch.device("cpu")
    pipe.enable_model_cpu_offload("cpu")
    assert pipe._offload_device == torch.device("cpu")
    with pytest.raises(RuntimeError, match="offload"):
        pipe.to("cpu")


def test_to_casts_every_model(fresh):
    pipe = fresh().to(dtype=torch.float64)
    assert {p.dtype for m in pipe.models for p in m.parameters()} == {torch.float64}
