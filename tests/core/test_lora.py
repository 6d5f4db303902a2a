"""LoRA adapters against diffusers' load_lora_weights + set_adapters (PEFT) on the same tiny weights and files."""

import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from sdxl_core import SDXLPipeline
from sdxl_core.lora import LoraError, applied, applied_rows, load_adapter
from sdxl_core.lora.write import kohya_tensors, random_layers

TOL = 1e-4
PROMPT = "a red fox in the snow"
CALL = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np", "height": 64, "width": 64}


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    return SDXLPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)


@pytest.fixture(scope="module")
def theirs(tiny_model_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def models_of(pipe):
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}


@pytest.fixture(scope="module")
def files(lora_files):
    return lora_files


@pytest.fixture
def clean(ours, theirs):
    yield
    ours.unload_lora_weights()
    theirs.unload_lora_weights()


def run(pipe, seed=0, **kwargs):
    if isinstance(pipe, SDXLPipeline):
        return pipe(seed=seed, **(CALL | kwargs)).images
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), **(CALL | kwargs)).images


@pytest.mark.parametrize("name", ["style", "detail", "text"])
def test_one_adapter_matches_diffusers(ours, theirs, files, clean, name):
    plain = run(ours)
    ours.load_lora_weights(files[name], adapter_name=name)
    theirs.load_lora_weights(str(files[name]), adapter_name=name)
    actual, expected = run(ours), run(theirs)
    assert max_diff(actual, expected) < TOL
    assert max_diff(actual, plain) > 100 * TOL  # the adapter changed the image


def test_two_adapters_with_weights_match_diffusers(ours, theirs, files, clean):
    for pipe in (ours, theirs):
        pipe.load_lora_weights(str(files["style"]), adapter_name="style")
        pipe.load_lora_weights(str(files["detail"]), adapter_name="detail")
    assert ours.get_active_adapters() == ["detail"]  # the last loaded
    for pipe in (ours, theirs):
        pipe.set_adapters(["style", "detail"], adapter_weights=[0.6, 1.3])
    assert max_diff(run(ours), run(theirs)) < TOL
    ours.set_adapters("style", 0.6)
    assert max_diff(run(ours, loras={"style": 0.6, "detail": 1.3}), run(theirs)) < TOL  # per call: same


def test_text_encoder_adapter_embeddings_match_diffusers(ours, theirs, files, clean):
    ours.load_lora_weights(files["text"], adapter_name="text")
    theirs.load_lora_weights(str(files["text"]), adapter_name="text")
    with ours.lora_context(None, None):
        mine = ours.encode_prompt(PROMPT, None, "blurry", None, 1, True)
    theirs_embeds = theirs.encode_prompt(PROMPT, negative_prompt="blurry", device="cpu")
    for a, b in zip((mine.prompt_embeds, mine.negative_prompt_embeds, mine.pooled_prompt_embeds,
                     mine.negative_pooled_prompt_embeds), theirs_embeds):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    plain = ours.encode_prompt(PROMPT, None, "blurry", None, 1, True)
    assert (plain.prompt_embeds - mine.prompt_embeds).abs().max() > 1e-3  # both encoders adapted
    assert (plain.pooled_prompt_embeds - mine.pooled_prompt_embeds).abs().max() > 1e-3


def test_kohya_names_in_either_layout_and_the_diffusers_format_are_one_adapter(ours, files, clean):
    ours.load_lora_weights(files["style"], adapter_name="sgm")
    ours.load_lora_weights(files["style_diffusers_names"], adapter_name="diffusers_names")
    a, b = ours._loras["sgm"], ours._loras["diffusers_names"]
    assert a.layers.keys() == b.layers.keys() and all(a.layers[c].keys() == b.layers[c].keys() for c in a.layers)
    assert {"unet", "text_encoder", "text_encoder_2"} == set(a.components)
    assert max_diff(run(ours, loras={"sgm": 1.0}), run(ours, loras={"diffusers_names": 1.0})) == 0


def test_cross_attention_kwargs_scale_matches_diffusers(ours, theirs, files, clean):
    for pipe in (ours, theirs):
        pipe.load_lora_weights(str(files["style"]), adapter_name="style")
        pipe.set_adapters(["style"], [0.8])
    kwargs = {"cross_attention_kwargs": {"scale": 0.5}}
    assert max_diff(run(ours, **kwargs), run(theirs, **kwargs)) < TOL
    assert max_diff(run(ours, **kwargs), run(ours, loras={"style": 0.4})) < 1e-6


def test_weight_zero_disable_and_unload_equal_no_adapter(ours, files, clean):
    plain = run(ours)
    ours.load_lora_weights(files["style"], adapter_name="style")
    assert max_diff(run(ours, loras={"style": 0.0}), plain) == 0
    assert max_diff(run(ours, loras={}), plain) == 0
    ours.disable_lora()
    assert max_diff(run(ours), plain) == 0
    ours.enable_lora()
    assert max_diff(run(ours), plain) > 100 * TOL
    ours.unload_lora_weights()
    assert max_diff(run(ours), plain) == 0
    assert ours.get_list_adapters() == {}


def test_fused_equals_unfused_and_unfuse_restores(ours, theirs, files, clean):
    plain = run(ours)
    ours.load_lora_weights(files["style"], adapter_name="style")
    ours.load_lora_weights(files["detail"], adapter_name="detail")
    ours.set_adapters(["style", "detail"], [0.7, 0.5])
    unfused = run(ours)
    ours.fuse_lora()
    assert ours.get_list_adapters() == {"unet": ["style", "detail"], "text_encoder": ["style"],
                                        "text_encoder_2": ["style"]}
    assert max_diff(run(ours), unfused) < TOL  # the fused terms are not applied a second time
    ours.unfuse_lora()
    assert max_diff(run(ours), unfused) < 1e-5  # weights back, to float rounding
    ours.fuse_lora(components=["unet"])  # the text encoders' terms stay unfused, and still apply
    assert max_diff(run(ours), unfused) < TOL
    ours.unfuse_lora()
    ours.disable_lora()
    assert max_diff(run(ours), plain) < 1e-5  # weights back as loaded, to float rounding


def test_threads_sharing_a_pipeline_each_get_their_adapters(ours, files, clean):
    ours.load_lora_weights(files["style"], adapter_name="style")
    ours.load_lora_weights(files["detail"], adapter_name="detail")
    calls = {"style": {"loras": {"style": 1.0}}, "detail": {"loras": {"detail": 0.8}}, "none": {"loras": {}}}
    alone = {name: run(ours, **kwargs) for name, kwargs in calls.items()}
    together, barrier = {}, threading.Barrier(len(calls))

    def worker(name):
        barrier.wait()
        together[name] = run(ours, **calls[name])

    threads = [threading.Thread(target=worker, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in calls:
        assert max_diff(together[name], alone[name]) == 0


def test_rows_of_one_forward_take_their_own_adapters(ours, files):
    models = models_of(ours)
    a, b = (load_adapter(files[n], models) for n in ("style", "detail"))
    unet, g = ours.unet, torch.Generator().manual_seed(0)
    c = unet.config
    inputs = (torch.randn(6, 4, 8, 8, generator=g), torch.full((6,), 500.0),
              torch.randn(6, 77, c.cross_attention_dim, generator=g), torch.randn(6, c.pooled_projection_dim, generator=g),
              torch.randn(6, c.num_time_ids, generator=g))
    with torch.no_grad():
        with applied_rows([({a: 1.0}, 2), (None, 2), ({a: 0.5, b: 2.0}, 2)]):
            packed = unet(*inputs)
        parts = []
        for loras, rows in (({a: 1.0}, slice(0, 2)), (None, slice(2, 4)), ({a: 0.5, b: 2.0}, slice(4, 6))):
            with applied(loras):
                parts.append(unet(*(t[rows] for t in inputs)))
    torch.testing.assert_close(packed, torch.cat(parts), atol=1e-5, rtol=0)
    assert (parts[0] - parts[1]).abs().max() > 1e-3


def test_bad_files_name_the_tensor_and_the_file(ours, files, tmp_path):
    models = models_of(ours)
    tensors = kohya_tensors(random_layers({"unet": ours.unet}, 4, seed=0, targets=("to_q",)))
    stray = dict(tensors) | {"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 8),
                             "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 4)}
    save_file(stray, tmp_path / "stray.safetensors")
    with pytest.raises(LoraError, match=r"stray\.safetensors.*lora_unet_no_such_layer\.lora_down\.weight"):
        load_adapter(tmp_path / "stray.safetensors", models)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    save_file(dict(tensors) | {key: torch.zeros(3, 4)}, tmp_path / "shape.safetensors")
    with pytest.raises(LoraError, match=rf"shape\.safetensors.*{key}.*\[3, 4\]"):
        load_adapter(tmp_path / "shape.safetensors", models)
    down_only = {k: v for k, v in tensors.items() if not k.endswith("lora_up.weight")}
    save_file(down_only, tmp_path / "half.safetensors")
    with pytest.raises(LoraError, match="no lora_up"):
        load_adapter(tmp_path / "half.safetensors", models)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraError, match="corrupt.safetensors"):
        load_adapter(tmp_path / "corrupt.safetensors", models)
    with pytest.raises(LoraError, match="safetensors only"):
        load_adapter(tmp_path / "adapter.bin", models)
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(1)}, tmp_path / "loha.safetensors")
    with pytest.raises(LoraError, match="LoHa"):
        load_adapter(tmp_path / "loha.safetensors", models)


def test_adapter_names_are_checked(ours, files, clean):
    ours.load_lora_weights(files["style"], adapter_name="style")
    with pytest.raises(ValueError, match="already in use"):
        ours.load_lora_weights(files["detail"], adapter_name="style")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        ours.set_adapters(["nope"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        run(ours, loras={"nope": 1.0})


def test_adapters_follow_the_model_to_another_device_or_dtype(ours, files):
    """Loaded while the UNet was float32, applied after .to(float64), as after pipe.to("cuda") or CPU offload."""
    unet = ours.unet
    adapter = load_adapter(files["detail"], models_of(ours))
    g, c = torch.Generator().manual_seed(0), unet.config
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 500.0),
              torch.randn(2, 77, c.cross_attention_dim, generator=g), torch.randn(2, c.pooled_projection_dim, generator=g),
              torch.randn(2, c.num_time_ids, generator=g))
    with torch.no_grad():
        with applied({adapter: 1.0}):
            want = unet(*inputs)
        unet.to(torch.float64)
        try:
            with applied({adapter: 1.0}):
                got = unet(*(t.double() for t in inputs))
        finally:
            unet.to(torch.float32)
    torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=0)
    assert next(iter(adapter.layers["unet"].values())).down.dtype == torch.float64
