"""A VAE on its own (a folder, an fp16-variant folder, a single file in either layout) loads strictly, swaps into
the pipelines by path, and decodes as diffusers' AutoencoderKL.from_pretrained / from_single_file do."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import save_file

from sdxl_core import SDXLImg2ImgPipeline, SDXLPipeline
from sdxl_core.errors import CheckpointMismatchError, UnknownModelTypeError, WeightsNotFoundError
from sdxl_core.loading import load_components, load_vae
from sdxl_core.loading.keymaps_vae import vae_keymap

LATENTS = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, 4, H/8, W/8)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_components(tiny_model_dir / "base")


@pytest.fixture(scope="module")
def alone(base, tiny_model_dir, tmp_path_factory) -> dict:
    """The tiny base's VAE written on its own in each layout a user may download."""
    root = tmp_path_factory.mktemp("vae-alone")
    state = base.vae.state_dict()
    original = {p.original: p.write(state).contiguous() for p in vae_keymap(base.vae.config)}
    fp16 = root / "fp16-folder"  # config.json and diffusion_pytorch_model.fp16.safetensors only
    fp16.mkdir()
    shutil.copy(tiny_model_dir / "base/vae/config.json", fp16)
    save_file({name: t.half() for name, t in state.items()}, fp16 / "diffusion_pytorch_model.fp16.safetensors")
    save_file(original, root / "sdxl_vae.safetensors")  # as stabilityai/sdxl-vae's: no prefix
    save_file({"first_stage_model." + name: t for name, t in original.items()}, root / "prefixed.safetensors")
    save_file(state, root / "diffusers.safetensors")
    return {
        "folder": shutil.copytree(tiny_model_dir / "base/vae", root / "folder"),
        "fp16_folder": fp16,
        "original_file": root / "sdxl_vae.safetensors",
        "prefixed_file": root / "prefixed.safetensors",
        "diffusers_file": root / "diffusers.safetensors",
        "whole_checkpoint": tiny_model_dir / "sd_xl_base_tiny.safetensors",
        "pipeline_folder": tiny_model_dir / "base",
    }


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _config(alone, name, tiny_model_dir):
    """Single files have SDXL 1.0's architecture unless told otherwise; the tiny one is told."""
    return tiny_model_dir / "base" if alone[name].is_file() else None


@pytest.mark.parametrize("name", ["folder", "original_file", "prefixed_file", "diffusers_file", "whole_checkpoint",
                                  "pipeline_folder"])
def test_each_layout_loads_the_full_models_vae_weights(base, alone, tiny_model_dir, name):
    vae = load_vae(alone[name], config=_config(alone, name, tiny_model_dir))
    assert_same_tensors(vae.state_dict(), base.vae.state_dict())
    assert vae.config == base.vae.config and not vae.training


def test_a_folder_holding_only_the_fp16_variant_loads_it_at_the_asked_dtype(base, alone):
    halves = {name: t.half() for name, t in base.vae.state_dict().items()}
    assert_same_tensors(load_vae(alone["fp16_folder"], torch_dtype=torch.float16).state_dict(), halves)
    assert_same_tensors(load_vae(alone["fp16_folder"], variant="fp16").state_dict(),
                        {name: t.float() for name, t in halves.items()})


@pytest.mark.parametrize("name, theirs", [
    ("folder", lambda p, model: DiffusersVAE.from_pretrained(p)),
    ("fp16_folder", lambda p, model: DiffusersVAE.from_pretrained(p, variant="fp16", torch_dtype=torch.float32)),
    ("original_file", lambda p, model: DiffusersVAE.from_single_file(p, config=str(model / "vae"))),
    ("prefixed_file", lambda p, model: DiffusersVAE.from_single_file(p, config=str(model / "vae"))),
])
def test_diffusers_loads_the_same_vae_and_decodes_within_1e_5(alone, tiny_model_dir, name, theirs):
    ours = load_vae(alone[name], config=_config(alone, name, tiny_model_dir))
    reference = theirs(str(alone[name]), tiny_model_dir / "base")
    with torch.no_grad():
        assert (ours.decode(LATENTS) - reference.decode(LATENTS).sample).abs().max() <= 1e-5


@pytest.mark.parametrize("name, dtype", [("folder", torch.float32), ("fp16_folder", torch.float16)])
def test_from_pretrained_with_a_vae_path_decodes_as_the_models_own_vae(tiny_model_dir, alone, name, dtype):
    default = SDXLPipeline.from_pretrained(tiny_model_dir / "base", torch_dtype=dtype, add_watermarker=False)
    swapped = SDXLPipeline.from_pretrained(tiny_model_dir / "base", torch_dtype=dtype, add_watermarker=False,
                                           vae=str(alone[name]))
    assert swapped.vae is not default.vae and swapped.vae.dtype == dtype
    assert np.array_equal(swapped.decode(LATENTS, "np"), default.decode(LATENTS, "np"))


def test_a_built_vae_is_shared_and_a_vae_path_also_swaps_into_single_file_loads(tiny_model_dir, alone):
    vae = load_vae(alone["original_file"], config=tiny_model_dir / "base")  # AutoencoderKL.from_single_file
    refiner = SDXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "refiner", vae=vae, add_watermarker=False)
    assert refiner.vae is vae
    pipe = SDXLPipeline.from_single_file(tiny_model_dir / "sd_xl_base_tiny.safetensors", config=tiny_model_dir / "base",
                                         vae=alone["folder"], add_watermarker=False)
    assert_same_tensors(pipe.vae.state_dict(), vae.state_dict())


def test_a_hub_id_fetches_only_the_vaes_files(fake_hub, base):
    vae = load_vae("madebyollin/sdxl-vae-fp16-fix")  # fake_hub answers with the tiny pipeline folder
    assert_same_tensors(vae.state_dict(), base.vae.state_dict())
    (repo_id, kwargs), = fake_hub
    assert repo_id == "madebyollin/sdxl-vae-fp16-fix"
    assert kwargs["allow_patterns"] == ["*.json", "*.txt", "diffusion_pytorch_model.safetensors",
                                        "vae/diffusion_pytorch_model.safetensors"]


# --- errors say what is wrong and what to do ----------------------------------------


def test_a_folder_without_config_json_says_what_a_vae_folder_holds(alone, tmp_path):
    folder = shutil.copytree(alone["folder"], tmp_path / "vae")
    (folder / "config.json").unlink()
    with pytest.raises(WeightsNotFoundError, match="a VAE folder has config.json"):
        load_vae(folder)


def test_a_single_file_of_another_architecture_names_its_tensors_and_the_config_argument(alone):
    with pytest.raises(CheckpointMismatchError, match=r"config=.*missing tensor\(s\): decoder\.up\.0\.block\.0"):
        load_vae(alone["original_file"])  # the tiny VAE read as SDXL 1.0's


@pytest.mark.parametrize("edit, pattern", [
    (lambda s: s.pop("decoder.conv_out.bias"), "missing tensor.*decoder.conv_out.bias"),
    (lambda s: s.update({"encoder.extra.weight": torch.zeros(1)}), "unexpected tensor.*encoder.extra.weight"),
])
def test_an_original_file_with_a_missing_or_unknown_tensor_names_it(alone, tiny_model_dir, tmp_path, edit, pattern):
    from safetensors.torch import load_file

    state = load_file(alone["original_file"])
    edit(state)
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointMismatchError, match=pattern):
        load_vae(tmp_path / "vae.safetensors", config=tiny_model_dir / "base")


def test_a_whole_checkpoint_of_another_model_is_refused(alone, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(alone["prefixed_file"]) | {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    save_file(state, tmp_path / "sd15ish.safetensors")
    with pytest.raises(UnknownModelTypeError, match="not an SDXL single-file checkpoint"):
        load_vae(tmp_path / "sd15ish.safetensors", config=tiny_model_dir / "base")
