"""Original single-file checkpoints (sd_xl_base_1.0 / sd_xl_refiner_1.0 layout): key maps, round trips, errors.

diffusers is the oracle: its own converter (single_file_utils.py) must read our key maps'
original names into the same tensors, and its from_single_file must load our files.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers.loaders import single_file_utils as diffusers_sf
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from sdxl_core.configs import (
    CLIP_L,
    OPENCLIP_BIGG,
    SDXL_BASE_UNET,
    SDXL_INPAINT_UNET,
    SDXL_REFINER_UNET,
    SDXL_VAE,
    TINY_BASE_UNET,
    TINY_CLIP_L,
    TINY_INPAINT_UNET,
    TINY_OPENCLIP_BIGG,
    TINY_REFINER_UNET,
    TINY_VAE,
)
from sdxl_core.errors import (
    CheckpointMismatchError,
    ModelTypeMismatchError,
    UnknownModelTypeError,
    UnsafeCheckpointError,
)
from sdxl_core.loading.components import empty_text_encoder, empty_unet, empty_vae
from sdxl_core.loading.folder import load_components
from sdxl_core.loading.single_file import (
    OPEN_CLIP_PREFIX,
    detect_model_type,
    load_single_file,
    save_single_file,
    single_file_keymaps,
)
from sdxl_core.loading.strict import TensorSpec
from sdxl_core.tiny import random_init

KINDS = ("base", "refiner", "inpainting")
FULL = {"base": SDXL_BASE_UNET, "refiner": SDXL_REFINER_UNET, "inpainting": SDXL_INPAINT_UNET}
TINY = {"base": TINY_BASE_UNET, "refiner": TINY_REFINER_UNET, "inpainting": TINY_INPAINT_UNET}
# Tensors in the full-size original files: as many as diffusers' (reference/README.md) except bigG's
# 517, whose q, k, v weights and biases (6 a layer) the original stacks as in_proj_weight / _bias.
FULL_COUNTS = {kind: {"unet": unet, "vae": 248, "text_encoder": 196, "text_encoder_2": 517 - 4 * 32}
               for kind, unet in (("base", 1680), ("refiner", 1220), ("inpainting", 1680))}
DIFFUSERS_TYPES = {"base": "xl_base", "refiner": "xl_refiner", "inpainting": "xl_inpaint"}


def empty_models(kind: str, size: str) -> dict:
    """Meta models of one model type, full size or tiny."""
    full = size == "full"
    unet = (FULL if full else TINY)[kind]
    clip, bigg, vae = (CLIP_L, OPENCLIP_BIGG, SDXL_VAE) if full else (TINY_CLIP_L, TINY_OPENCLIP_BIGG, TINY_VAE)
    return {"unet": empty_unet(unet), "vae": empty_vae(vae),
            "text_encoder": empty_text_encoder(clip) if kind != "refiner" else None,
            "text_encoder_2": empty_text_encoder(bigg)}


def random_models(kind: str, unet=None, clip=TINY_CLIP_L, bigg=TINY_OPENCLIP_BIGG) -> dict:
    return {"unet": random_init(empty_unet(unet or TINY[kind]), "unet"),
            "vae": random_init(empty_vae(TINY_VAE), "vae"),
            "text_encoder": random_init(empty_text_encoder(clip), "clip") if kind != "refiner" else None,
            "text_encoder_2": random_init(empty_text_encoder(bigg), "bigg")}


def diffusers_convert(original: dict, kind: str, models: dict) -> dict:
    """diffusers' own conversion of an original state dict, per component."""
    te, te2 = models["text_encoder"], models["text_encoder_2"]
    out = {"unet": diffusers_sf.convert_ldm_unet_checkpoint(original, models["unet"].config.to_diffusers()),
           "vae": diffusers_sf.convert_ldm_vae_checkpoint(original, models["vae"].config.to_diffusers()),
           "text_encoder_2": diffusers_sf.convert_open_clip_checkpoint(te2, original, prefix=OPEN_CLIP_PREFIX[kind])}
    if te is not None:
        clip = diffusers_sf.convert_ldm_clip_checkpoint(original)
        out["text_encoder"] = clip if hasattr(te, "text_model") else {k.removeprefix("text_model."): v
                                                                       for k, v in clip.items()}
    return out


def assert_same_tensors(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].shape == t.shape, name
        if not t.is_meta:
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


# --- key maps ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_keymaps_pair_every_model_tensor_with_exactly_one_original(kind, size):
    models = empty_models(kind, size)
    keymaps = single_file_keymaps(**models)
    assert set(keymaps) == {name for name, m in models.items() if m is not None}
    originals = [p.original for pairs in keymaps.values() for p in pairs]
    assert len(originals) == len(set(originals))
    for name, pairs in keymaps.items():
        state = models[name].state_dict()
        ours = [m for p in pairs for m in p.model]
        assert sorted(ours) == sorted(state)  # each model tensor exactly once
        for p in pairs:  # and back: the original's shape reads as the model's shapes
            stored = TensorSpec(p.original, tuple(p.write(state).shape), lambda: None)
            assert [s.name for s in p.read(stored)] == list(p.model)
            assert [s.shape for s in p.read(stored)] == [tuple(state[m].shape) for m in p.model]
        if size == "full":
            assert len(pairs) == FULL_COUNTS[kind][name], name


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_converter_reads_our_original_names_as_we_do(kind, size):
    """Full size on meta (names and shapes); tiny with distinct random values (every tensor's data)."""
    models = empty_models(kind, size) if size == "full" else random_models(kind)
    keymaps = single_file_keymaps(**models)
    states = {name: models[name].state_dict() for name in keymaps}
    original = {p.original: p.write(states[name]) for name, pairs in keymaps.items() for p in pairs}
    if size == "full":  # diffusers' detection needs bigG's 10th layer
        assert diffusers_sf.infer_diffusers_model_type(original) == DIFFUSERS_TYPES[kind]
    specs = {name: TensorSpec(name, tuple(t.shape), lambda: None) for name, t in original.items()}
    assert detect_model_type(specs, "original") == kind
    for name, converted in diffusers_convert(original, kind, models).items():
        assert_same_tensors(converted, states[name])


def test_reading_a_pair_inverts_writing_it():
    """Every layout change (1x1 conv, transpose, stacked q/k/v) reads back what it wrote."""
    models = random_models("base")
    for name, pairs in single_file_keymaps(**models).items():
        state = models[name].state_dict()
        for p in pairs:
            t = p.write(state)
            read = {s.name: s.load() for s in p.read(TensorSpec(p.original, tuple(t.shape), lambda t=t: t))}
            assert_same_tensors(read, {m: state[m] for m in p.model})


# --- files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpainting_file(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inpainting") / "sd_xl_inpainting_tiny.safetensors"
    return save_single_file(load_components(tiny_model_dir / "inpainting"), path)


def single_file(tiny_model_dir: Path, inpainting_file: Path, kind: str) -> Path:
    return inpainting_file if kind == "inpainting" else tiny_model_dir / f"sd_xl_{kind}_tiny.safetensors"


def assert_same_models(got, want, dtype=None):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert_same_tensors(a.state_dict(), {k: v.to(dtype or v.dtype) for k, v in b.state_dict().items()})


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_round_trip_gives_the_folder_models(kind, tiny_model_dir, inpainting_file):
    folder = tiny_model_dir / kind
    loaded = load_single_file(single_file(tiny_model_dir, inpainting_file, kind), config=folder)
    want = load_components(folder)
    assert_same_models(loaded, want)
    assert loaded.model_type == kind
    assert loaded.force_zeros_for_empty_prompt is (kind != "refiner")
    assert loaded.requires_aesthetics_score is (kind == "refiner")
    assert loaded.scheduler_config == want.scheduler_config
    assert (loaded.tokenizer is None) == (kind == "refiner")
    assert loaded.tokenizer_2.pad_token == want.tokenizer_2.pad_token == "!"


def test_single_file_loads_at_the_requested_dtype(tiny_model_dir):
    loaded = load_single_file(tiny_model_dir / "sd_xl_refiner_tiny.safetensors", torch.float16,
                              config=tiny_model_dir / "refiner")
    assert_same_models(loaded, load_components(tiny_model_dir / "refiner"), dtype=torch.float16)


def test_pickle_checkpoint_is_refused_unless_allowed(tiny_model_dir, tmp_path):
    path = tmp_path / "sd_xl_base_tiny.ckpt"
    torch.save({"state_dict": load_file(tiny_model_dir / "sd_xl_base_tiny.safetensors")}, path)  # as sgm saves
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(path))):
        load_single_file(path, config=tiny_model_dir / "base")
    loaded = load_single_file(path, config=tiny_model_dir / "base", allow_pickle=True)
    assert_same_models(loaded, load_components(tiny_model_dir / "base"))


# --- diffusers reads our files ---------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_from_single_file_loads_our_file_and_gives_our_outputs(kind, tiny_model_dir, inpainting_file,
                                                                         monkeypatch):
    import diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, folder = single_file(tiny_model_dir, inpainting_file, kind), tiny_model_dir / kind
    pipeline = {"base": diffusers.StableDiffusionXLPipeline, "refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
                "inpainting": diffusers.StableDiffusionXLInpaintPipeline}[kind]
    pipe = pipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    ours = load_single_file(path, config=folder)
    assert_same_models(pipe, ours)

    gen = torch.Generator().manual_seed(0)
    c = ours.unet.config
    sample = torch.randn(1, c.in_channels, 8, 8, generator=gen)
    context = torch.randn(1, 77, c.cross_attention_dim, generator=gen)
    pooled = torch.randn(1, c.pooled_projection_dim, generator=gen)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64][: c.num_time_ids]])
    ids = ours.tokenizer_2(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = pipe.unet(sample, 500, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert_close(ours.unet(sample, 500, context, pooled, time_ids), want, atol=1e-5, rtol=0)
        assert_close(ours.vae.decode(sample[:, :4]), pipe.vae.decode(sample[:, :4]).sample, atol=1e-5, rtol=0)
        assert_close(ours.text_encoder_2(ids).text_embeds, pipe.text_encoder_2(ids).text_embeds, atol=1e-5, rtol=0)


# --- errors ----------------------------------------------------------------------------------


@pytest.fixture
def base_tensors(tiny_model_dir) -> dict:
    return load_file(tiny_model_dir / "sd_xl_base_tiny.safetensors")


def write(tensors: dict, path: Path) -> Path:
    save_file(tensors, path)
    return path


def test_file_without_bigg_is_an_unknown_model_type(base_tensors, tmp_path, tiny_model_dir):
    unet_and_vae = {k: v for k, v in base_tensors.items() if not k.startswith("conditioner.")}
    path = write(unet_and_vae, tmp_path / "x.safetensors")
    with pytest.raises(UnknownModelTypeError, match=rf"{re.escape(str(path))}.*conditioner\.embedders\.1\.model\."):
        load_single_file(path, config=tiny_model_dir / "base")


QKV = OPEN_CLIP_PREFIX["base"] + "transformer.resblocks.0.attn.in_proj_weight"
BIGG_WIDTH = TINY_OPENCLIP_BIGG.hidden_size


@pytest.mark.parametrize("name, value, named", [
    ("model.diffusion_model.extra.weight", torch.zeros(1),
     r"1 unexpected tensor\(s\): model\.diffusion_model\.extra\.weight"),
    ("first_stage_model.decoder.mid.attn_1.q.bias", None,
     r"1 missing tensor\(s\): first_stage_model\.decoder\.mid\.attn_1\.q\.bias"),
    ("model.diffusion_model.out.2.weight", torch.zeros(4, 32, 1, 1),
     r"model\.diffusion_model\.out\.2\.weight \[4, 32, 1, 1\] \(model expects \[4, 32, 3, 3\]\)"),
    (QKV, torch.zeros(3 * BIGG_WIDTH + 1, BIGG_WIDTH),
     rf"in_proj_weight \[{3 * BIGG_WIDTH + 1}, {BIGG_WIDTH}\] \(model expects \[{3 * BIGG_WIDTH}, {BIGG_WIDTH}\]\)"),
], ids=["unexpected", "missing", "misshaped", "misshaped-stacked-qkv"])
def test_tensor_mismatch_names_tensor_and_file(name, value, named, base_tensors, tmp_path, tiny_model_dir):
    if value is None:
        del base_tensors[name]
    else:
        base_tensors[name] = value
    path = write(base_tensors, tmp_path / "x.safetensors")
    pattern = rf"^{re.escape(str(path))} does not match the model: .*{named}"
    with pytest.raises(CheckpointMismatchError, match=pattern):
        load_single_file(path, config=tiny_model_dir / "base")


def test_known_non_weight_tensors_are_ignored(base_tensors, tmp_path, tiny_model_dir):
    extra = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77.0)[None],
             "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6052), "denoiser.sigmas": torch.ones(1000),
             "alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.tensor(0.9999),
             "model_ema.diffusion_modelout2weight": torch.zeros(4, 32, 3, 3)}
    path = write(base_tensors | extra, tmp_path / "x.safetensors")
    loaded = load_single_file(path, config=tiny_model_dir / "base")
    assert_same_models(loaded, load_components(tiny_model_dir / "base"))


def test_config_folder_of_another_model_type_is_refused(tiny_model_dir):
    with pytest.raises(ModelTypeMismatchError, match="refiner.*base"):
        load_single_file(tiny_model_dir / "sd_xl_refiner_tiny.safetensors", config=tiny_model_dir / "base")


def test_without_config_the_sdxl_1_0_architecture_is_expected(tiny_model_dir):
    path = tiny_model_dir / "sd_xl_base_tiny.safetensors"
    with pytest.raises(CheckpointMismatchError, match=re.escape(str(path))) as error:
        load_single_file(path)
    assert ("model.diffusion_model.input_blocks.0.0.weight", (32, 4, 3, 3), (320, 4, 3, 3)) in error.value.mismatched
