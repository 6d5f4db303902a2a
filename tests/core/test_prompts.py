"""Text encoders and SDXL prompt encoding against diffusers' pipelines on the same tiny weights."""

import logging

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdxl_core.configs import CLIP_L, OPENCLIP_BIGG, TINY_CLIP_L, TINY_OPENCLIP_BIGG
from sdxl_core.prompts import PromptEmbeddings, encode_prompt
from sdxl_core.text_encoders import build_text_encoder, clip_text_config
from sdxl_core.tokenizers import load_tokenizer, write_tokenizer_files
from tests.oracle import REFERENCE_DIR

REFERENCE = REFERENCE_DIR / "base"
FIELDS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


# --- text encoders --------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, folder, parameters",
    [(CLIP_L, "text_encoder", 123_060_480), (OPENCLIP_BIGG, "text_encoder_2", 694_659_840)],
)
def test_full_size_text_encoders_on_meta(config, folder, parameters):
    model = build_text_encoder(config, device="meta")
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.config._attn_implementation == "sdpa"
    cls = CLIPTextModelWithProjection if config.with_projection else CLIPTextModel
    with torch.device("meta"):
        official = cls(CLIPTextConfig.from_json_file(REFERENCE / folder / "config.json"))
    assert type(model) is cls
    shapes = {name: t.shape for name, t in official.state_dict().items()}
    assert {name: t.shape for name, t in model.state_dict().items()} == shapes


@pytest.mark.parametrize("config", [TINY_CLIP_L, TINY_OPENCLIP_BIGG])
def test_sdpa_text_encoder_matches_eager(config):
    model = build_text_encoder(config)
    eager_config = clip_text_config(config)
    eager_config._attn_implementation = "eager"
    eager = type(model)(eager_config).eval()
    eager.load_state_dict(model.state_dict())
    ids = torch.randint(0, 49406, (2, 77))
    ids[:, -1] = 49407
    with torch.no_grad():
        out, ref = model(ids, output_hidden_states=True), eager(ids, output_hidden_states=True)
    assert (out.hidden_states[-2] - ref.hidden_states[-2]).abs().max() <= 1e-5
    assert (out[0] - ref[0]).abs().max() <= 1e-5  # last hidden state, or bigG's projected pooled


# --- prompt encoding --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    pads = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    return [load_tokenizer(write_tokenizer_files(root / name, pad)) for name, pad in pads.items()]


@pytest.fixture(scope="module")
def text_encoders():
    torch.manual_seed(0)
    return [build_text_encoder(TINY_CLIP_L), build_text_encoder(TINY_OPENCLIP_BIGG)]


@pytest.fixture(scope="module")
def base(text_encoders, tokenizers):
    # encode_prompt needs no unet, vae or scheduler; the pipelines accept None for them.
    return StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None, add_watermarker=False,
        text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
    )


@pytest.fixture(scope="module")
def refiner(text_encoders, tokenizers):
    return StableDiffusionXLImg2ImgPipeline(
        vae=None, unet=None, scheduler=None, add_watermarker=False,
        text_encoder=None, text_encoder_2=text_encoders[1], tokenizer=None, tokenizer_2=tokenizers[1],
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )


def ours(pipe, **kwargs) -> PromptEmbeddings:
    return encode_prompt(
        [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2],
        force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt, **kwargs,
    )


def assert_matches_diffusers(pipe, **kwargs):
    got = ours(pipe, **kwargs)
    expected = pipe.encode_prompt(device="cpu", **kwargs)
    for name, want in zip(FIELDS, expected):
        have = getattr(got, name)
        if want is None:
            assert have is None, name
        else:
            assert have.shape == want.shape, name
            assert (have - want).abs().max() <= 1e-5, name
    return got


CAT = "a photo of a cat"
BASE_CASES = {
    "prompt": dict(prompt=CAT),
    "prompt_2": dict(prompt=CAT, prompt_2="an oil painting of a dog"),
    "negatives": dict(prompt=CAT, negative_prompt="blurry", negative_prompt_2="low quality"),
    "negative_for_both": dict(prompt=CAT, negative_prompt="blurry"),
    "empty_string_negative": dict(prompt=CAT, negative_prompt=""),  # encoded: only None gives zeros
    "batch": dict(prompt=["a cat", "a dog"], prompt_2=["red", "blue"], negative_prompt=["ugly", "dark"],
                  num_images_per_prompt=2),
    "no_guidance": dict(prompt=["a cat", "a dog"], do_classifier_free_guidance=False, num_images_per_prompt=3),
    "longer_than_77_tokens": dict(prompt="cat " * 100, negative_prompt="dog " * 100),
}
REFINER_CASES = {
    "prompt": dict(prompt=CAT),
    # diffusers gives the refiner's one encoder `prompt` and `negative_prompt`; the _2 texts go unused.
    "prompt_2_and_negatives": dict(prompt=CAT, prompt_2="a dog", negative_prompt="ugly", negative_prompt_2="sharp"),
    "batch": dict(prompt=["a cat", "a dog"], negative_prompt=["ugly", "dark"], num_images_per_prompt=2),
}


@pytest.mark.parametrize("kwargs", BASE_CASES.values(), ids=BASE_CASES.keys())
def test_base_matches_diffusers(base, kwargs):
    got = assert_matches_diffusers(base, **kwargs)
    assert got.prompt_embeds.shape[1:] == (77, TINY_CLIP_L.hidden_size + TINY_OPENCLIP_BIGG.hidden_size)


@pytest.mark.parametrize("kwargs", REFINER_CASES.values(), ids=REFINER_CASES.keys())
def test_refiner_matches_diffusers(refiner, kwargs):
    got = assert_matches_diffusers(refiner, **kwargs)
    assert got.prompt_embeds.shape[1:] == (77, TINY_OPENCLIP_BIGG.hidden_size)


def test_missing_negative_is_zeros_for_base_and_encoded_empty_for_refiner(base, refiner):
    zeros = ours(base, prompt=CAT)
    assert not zeros.negative_prompt_embeds.any() and not zeros.negative_pooled_prompt_embeds.any()
    empty = ours(refiner, prompt=CAT)
    assert torch.equal(empty.negative_prompt_embeds, ours(refiner, prompt="").prompt_embeds)


def test_prompt_2_feeds_only_bigg(base):
    plain, mixed = ours(base, prompt=CAT), ours(base, prompt=CAT, prompt_2="an oil painting of a dog")
    clip_l = TINY_CLIP_L.hidden_size
    assert torch.equal(mixed.prompt_embeds[..., :clip_l], plain.prompt_embeds[..., :clip_l])
    assert (mixed.prompt_embeds[..., clip_l:] - plain.prompt_embeds[..., clip_l:]).abs().max() > 1e-2
    assert (mixed.pooled_prompt_embeds - plain.pooled_prompt_embeds).abs().max() > 1e-2


def test_num_images_per_prompt_keeps_each_prompts_copies_together(base):
    prompts = dict(prompt=["a cat", "a dog"], negative_prompt=["ugly", "dark"])
    single, repeated = ours(base, **prompts), ours(base, **prompts, num_images_per_prompt=2)
    for name in FIELDS:
        assert torch.equal(getattr(repeated, name), getattr(single, name)[[0, 0, 1, 1]]), name


@pytest.mark.parametrize("field", ["negative_prompt", "negative_prompt_2", "prompt_2"])
def test_batch_size_mismatch_names_both_sizes(base, field):
    kwargs = {"negative_prompt": "ugly", field: ["a", "b", "c"]}
    with pytest.raises(ValueError, match=f"`{field}` has batch size 3, but `prompt` has batch size 2"):
        ours(base, prompt=["a cat", "a dog"], **kwargs)


def test_long_prompt_is_truncated_with_a_warning_quoting_the_cut(base, caplog):
    kept = " ".join(["cat"] * 75)  # 75 one-token words + BOS + EOS = 77
    with caplog.at_level(logging.WARNING, logger="sdxl_core.prompts"):
        exact = ours(base, prompt=kept)
        assert not caplog.records
        truncated = ours(base, prompt=kept + " zebra giraffe")
    assert torch.equal(truncated.prompt_embeds, exact.prompt_embeds)
    assert torch.equal(truncated.pooled_prompt_embeds, exact.pooled_prompt_embeds)
    messages = [r.getMessage() for r in caplog.records if r.name == "sdxl_core.prompts"]
    assert messages and all("up to 77 tokens: 'zebra giraffe'" in m for m in messages)


def test_threads_sharing_a_tokenizer_get_their_own_padding(tokenizers):
    """A fast tokenizer's padding lives on the shared Rust object; concurrent calls must not mix it up."""
    from concurrent.futures import ThreadPoolExecutor

    from sdxl_core.prompts import _tokenize

    tokenizer = tokenizers[0]
    prompts = [["a red fox"], ["a long prompt " * 30, "short"]]
    expected = [_tokenize(tokenizer, p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: (i % 2, _tokenize(tokenizer, prompts[i % 2])), range(400)))
    assert all(torch.equal(ids, expected[k]) for k, ids in results)
