"""Diffusers-format folders: strict loading, dtype and variant handling, and the layout's reality check."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdxl_core.configs import TINY_BASE_UNET, TINY_OPENCLIP_BIGG
from sdxl_core.errors import (
    CheckpointMismatchError,
    ModelTypeMismatchError,
    UnknownModelTypeError,
    UnsafeCheckpointError,
    WeightsNotFoundError,
)
from sdxl_core.loading.components import empty_unet
from sdxl_core.loading.folder import (
    load_components,
    load_text_encoder,
    load_unet,
    load_vae,
    save_components,
    text_encoder_state_dict,
)
from sdxl_core.loading.strict import TensorSpec, load_strict, meta_init, safetensors_specs

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_components(tiny_model_dir / "base")


@pytest.fixture
def vae_copy(tiny_model_dir, tmp_path):
    """A copy of the tiny VAE folder to damage."""
    return shutil.copytree(tiny_model_dir / "base" / "vae", tmp_path / "vae")


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def unet_inputs(config, batch=2):
    g = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(batch, config.in_channels, 8, 8, generator=g),
        timestep=torch.tensor([999.0, 321.0]),
        encoder_hidden_states=torch.randn(batch, 77, config.cross_attention_dim, generator=g),
        text_embeds=torch.randn(batch, config.pooled_projection_dim, generator=g),
        time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64][: config.num_time_ids]] * batch),
    )


# --- round trip, dtype, variant -------------------------------------------------------


def test_saved_folder_loads_back_with_every_tensor_equal(base, tiny_model_dir, tmp_path):
    save_components(base, tmp_path / "copy")
    again = load_components(tmp_path / "copy")
    for name in MODELS:
        assert_same_tensors(getattr(base, name).state_dict(), getattr(again, name).state_dict())
        assert all(p.dtype == torch.float32 for p in getattr(again, name).parameters())
    for name in ("model_index.json", "unet/config.json", "text_encoder_2/config.json", "tokenizer/vocab.json"):
        assert (tmp_path / "copy" / name).read_bytes() == (tiny_model_dir / "base" / name).read_bytes(), name
    assert again.tokenizer("a cat").input_ids == base.tokenizer("a cat").input_ids
    assert (again.scheduler_config, again.force_zeros_for_empty_prompt) == (base.scheduler_config, True)


def test_torch_dtype_float16_allocates_every_tensor_in_fp16(base, tiny_model_dir):
    half = load_components(tiny_model_dir / "base", torch_dtype=torch.float16)
    for name in MODELS:
        model = getattr(half, name)
        assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
        assert {p.dtype for p in model.parameters()} == {torch.float16}
        expected = {k: v.half() for k, v in getattr(base, name).state_dict().items()}
        assert_same_tensors(model.state_dict(), expected)
    # transformers' non-persistent position_ids buffer is no weight: real, and still int64
    assert half.text_encoder_2.get_buffer("text_model.embeddings.position_ids").dtype == torch.int64


def test_fp16_variant_loads_when_asked_and_is_explained_when_not(base, tiny_model_dir, tmp_path):
    half = load_components(tiny_model_dir / "base", torch_dtype=torch.float16)
    save_components(half, tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16/unet/diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / "fp16/text_encoder/model.fp16.safetensors").is_file()

    again = load_components(tmp_path / "fp16", torch_dtype=torch.float16, variant="fp16")
    for name in MODELS:
        assert_same_tensors(getattr(half, name).state_dict(), getattr(again, name).state_dict())
    upcast = load_unet(tmp_path / "fp16/unet", variant="fp16")  # torch_dtype=None: float32, as diffusers
    assert_same_tensors(upcast.state_dict(), {k: v.float() for k, v in half.unet.state_dict().items()})

    with pytest.raises(WeightsNotFoundError, match=r"fp16/unet.*diffusion_pytorch_model.fp16.safetensors.*variant='fp16'"):
        load_components(tmp_path / "fp16")
    with pytest.raises(WeightsNotFoundError, match=r"no fp16 variant in .*base/unet.*variant=None"):
        load_unet(tiny_model_dir / "base/unet", variant="fp16")


def test_sharded_checkpoint_loads_and_a_wrong_index_is_named(base, vae_copy):
    state = load_file(vae_copy / "diffusion_pytorch_model.safetensors")
    names = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: state[n] for n in shard_names}, vae_copy / shard)
    (vae_copy / "diffusion_pytorch_model.safetensors").unlink()
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    index = vae_copy / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_tensors(load_vae(vae_copy).state_dict(), base.vae.state_dict())

    weight_map[names[0]] = "diffusion_pytorch_model-00002-of-00002.safetensors"  # it is in shard 1
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointMismatchError, match=rf"00001-of-00002.*unexpected.*{names[0]}"):
        load_vae(vae_copy)


# --- the layout is diffusers' and transformers' own ---------------------------------------


@pytest.mark.parametrize("model_type", ["base", "refiner", "inpainting"])
def test_diffusers_loads_our_unet_folder_and_agrees(tiny_model_dir, model_type):
    folder = tiny_model_dir / model_type / "unet"
    ours, theirs = load_unet(folder), UNet2DConditionModel.from_pretrained(folder)
    assert_same_tensors(ours.state_dict(), theirs.state_dict())
    x = unet_inputs(ours.config)
    with torch.no_grad():
        expected = theirs(x["sample"], x["timestep"], x["encoder_hidden_states"],
                          added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
        actual = ours(**x)
    assert (actual - expected).abs().max() <= 1e-5


def test_diffusers_loads_our_vae_folder_and_agrees(base, tiny_model_dir):
    theirs = DiffusersVAE.from_pretrained(tiny_model_dir / "base" / "vae")
    assert_same_tensors(base.vae.state_dict(), theirs.state_dict())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (base.vae.decode(latents) - theirs.decode(latents).sample).abs().max() <= 1e-5


def test_transformers_loads_our_text_encoder_folders_and_agrees(base, tiny_model_dir):
    ids = base.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        ours, theirs = getattr(base, name), cls.from_pretrained(tiny_model_dir / "base" / name)
        assert_same_tensors(ours.state_dict(), theirs.state_dict())
        with torch.no_grad():
            a, b = ours(ids, output_hidden_states=True), theirs(ids, output_hidden_states=True)
        assert (a.hidden_states[-2] - b.hidden_states[-2]).abs().max() <= 1e-5
        if name == "text_encoder_2":
            assert (a.text_embeds - b.text_embeds).abs().max() <= 1e-5


def test_text_encoder_files_use_the_official_names_and_both_layouts_load(base, tiny_model_dir, tmp_path):
    # stabilityai's text_encoder/model.safetensors (transformers 4) keeps CLIP-L under "text_model."
    with safe_open(tiny_model_dir / "base/text_encoder/model.safetensors", "pt") as f:
        assert all(name.startswith("text_model.") for name in f.keys())
    folder = shutil.copytree(tiny_model_dir / "base/text_encoder", tmp_path / "text_encoder")
    official = text_encoder_state_dict(base.text_encoder)
    unwrapped = {name.removeprefix("text_model."): t.clone() for name, t in official.items()}
    save_file(unwrapped, folder / "model.safetensors")  # as transformers >= 5.6 saves CLIPTextModel
    assert_same_tensors(load_text_encoder(folder).state_dict(), base.text_encoder.state_dict())


def test_diffusers_pipelines_load_our_folders(tiny_model_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir / "base")
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "refiner")
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score is True and refiner.config.force_zeros_for_empty_prompt is False


def test_refiner_folder_loads_without_clip_l(tiny_model_dir):
    refiner = load_components(tiny_model_dir / "refiner")
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.model_type == "refiner" and refiner.requires_aesthetics_score
    assert not refiner.force_zeros_for_empty_prompt and refiner.tokenizer_2.pad_token == "!"
    assert load_components(tiny_model_dir / "inpainting").model_type == "inpainting"


# --- errors name the tensor and the file ---------------------------------------------------


def _drop(state):
    del state["decoder.conv_out.bias"]


def _add(state):
    state["decoder.conv_out.extra"] = torch.zeros(3)


def _reshape(state):
    state["decoder.conv_out.bias"] = torch.zeros(4)


@pytest.mark.parametrize("edit, pattern, field", [
    (_drop, r"1 missing tensor\(s\): decoder.conv_out.bias", "missing"),
    (_add, r"1 unexpected tensor\(s\): decoder.conv_out.extra", "unexpected"),
    (_reshape, r"wrong shape: decoder.conv_out.bias \[4\] \(model expects \[3\]\)", "mismatched"),
])
def test_mismatched_tensor_is_named_with_its_file(vae_copy, edit, pattern, field):
    weights = vae_copy / "diffusion_pytorch_model.safetensors"
    state = {k: v.clone() for k, v in load_file(weights).items()}
    edit(state)
    save_file(state, weights)
    with pytest.raises(CheckpointMismatchError, match=pattern) as error:
        load_vae(vae_copy)
    assert str(weights) in str(error.value) and len(getattr(error.value, field)) == 1


def test_names_and_shapes_are_checked_before_any_tensor_is_read():
    def unreadable():
        raise AssertionError("read a tensor before checking names")

    model = nn.Linear(2, 3, device="meta")
    specs = [TensorSpec("weight", (3, 2), unreadable), TensorSpec("bias", (2,), unreadable)]
    with pytest.raises(CheckpointMismatchError, match=r"bias \[2\] \(model expects \[3\]\)"):
        load_strict(model, specs, "test.safetensors")


def test_integer_tensors_keep_their_dtype():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))
            self.register_buffer("scale", torch.ones(2), persistent=False)

    with meta_init():
        model = Counter()
    values = {"proj.weight": torch.randn(2, 2), "proj.bias": torch.randn(2), "steps": torch.tensor([3, 4])}
    specs = [TensorSpec(name, tuple(t.shape), lambda t=t: t) for name, t in values.items()]
    load_strict(model, specs, "counter", dtype=torch.float16)
    assert model.proj.weight.dtype == torch.float16 and model.steps.dtype == torch.int64
    assert torch.equal(model.steps, values["steps"]) and torch.equal(model.proj.weight, values["proj.weight"].half())
    assert model.scale.dtype == torch.float32  # non-persistent buffers are the module's own constants
    with pytest.raises(ValueError, match="floating-point dtype"):
        load_strict(model, specs, "counter", dtype=torch.int8)


def test_long_listings_are_cut_after_ten_names():
    error = CheckpointMismatchError("f.safetensors", missing=[f"t{i:02d}" for i in range(25)])
    assert "25 missing tensor(s): t00, t01" in str(error) and "t09 ... and 15 more" in str(error)
    assert "t10" not in str(error)


def test_pickle_weights_are_refused_unless_allowed(base, vae_copy):
    torch.save(base.vae.state_dict(), vae_copy / "diffusion_pytorch_model.bin")
    (vae_copy / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"diffusion_pytorch_model.bin.*allow_pickle=True"):
        load_vae(vae_copy)
    assert_same_tensors(load_vae(vae_copy, allow_pickle=True).state_dict(), base.vae.state_dict())


def test_missing_component_folder_or_index_is_named(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir / "base", tmp_path / "base")
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(WeightsNotFoundError, match=r"folder not found: .*base/text_encoder"):
        load_components(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(WeightsNotFoundError, match=r"base/model_index.json.*load_unet"):
        load_components(folder)
    (folder / VAE_FILE).unlink()
    with pytest.raises(WeightsNotFoundError, match=r"no weights in .*base/vae: looked for diffusion_pytorch_model.safe"):
        load_vae(folder / "vae")


def test_non_sdxl_unet_config_is_an_unknown_model_type(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir / "base" / "unet", tmp_path / "unet")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"addition_embed_type": None}))  # SD 1.5-like
    with pytest.raises(UnknownModelTypeError, match=r"unet/config.json: not an SDXL UNet"):
        load_unet(folder)


def test_model_index_without_clip_l_for_a_base_unet_is_a_mismatch(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir / "base", tmp_path / "base")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"text_encoder": [None, None]}))
    expected = rf"cross_attention_dim is {TINY_BASE_UNET.cross_attention_dim}.*give {TINY_OPENCLIP_BIGG.hidden_size}$"
    with pytest.raises(ModelTypeMismatchError, match=expected):
        load_components(folder)


# --- memory: one tensor at a time, straight into place ---------------------------------------


def test_each_tensor_is_placed_before_the_next_is_read(tiny_model_dir):
    model = empty_unet(TINY_BASE_UNET)
    placed = []

    def counting(spec):
        def load():
            placed.append(sum(not p.is_meta for p in model.parameters()))
            return spec.load()
        return TensorSpec(spec.name, spec.shape, load)

    specs = safetensors_specs(tiny_model_dir / "base/unet/diffusion_pytorch_model.safetensors")
    load_strict(model, [counting(s) for s in specs], "unet", dtype=torch.float16)
    assert placed == list(range(len(specs)))  # the model never held a second copy
    assert {p.dtype for p in model.parameters()} == {torch.float16}
