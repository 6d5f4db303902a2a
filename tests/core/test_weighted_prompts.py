"""prompt_syntax="compel": the parser against compel's, embeddings against compel's and images against diffusers'
pipelines fed compel's embeddings, on the tiny weights."""

import random

import numpy as np
import pytest
import torch
from compel import Compel, CompelForSDXL, ReturnedEmbeddingsType
from compel.prompt_parser import Blend as CompelBlend
from compel.prompt_parser import PromptParser
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from sdxl_core import SDXLImg2ImgPipeline, SDXLPipeline
from sdxl_core.prompt_syntax import Blend, PromptSyntaxError, a1111_to_compel, parse_prompt
from sdxl_core.prompts import encode_prompt
from tests.oracle import DIFFUSERS_SCHEDULERS

PENULTIMATE = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
TOL = 1e-5  # embeddings
IMAGE_TOL = 1e-4  # images, as tests/core/test_pipelines.py
# 3 chunks: sentences of weighted words, split at sentence ends.
LONG = "a photo of a (red)1.3 fox++ sitting in deep snow--, with (tall)0.8 mountains behind it. " * 9
WEIGHTED = {
    "long_3_chunks": LONG,
    "attention_number": "a (red)1.3 fox in the snow",
    "plus_plus": "a red fox++ in the snow",
    "minus_minus": "a red fox in the snow--",
    "nested": "a ((red)1.2 fox, (small)0.7 ears)1.1 in the snow",
    "quoted_and_explicit": 'a "red fox"0.6 (in the snow).attend(1.4)',
    "weight_0": "a (red)0 fox",
    "downweight_across_chunks": "a cat " * 30 + "(" + "bright snow " * 30 + ")0.6 tail",
    "words_no_punctuation": "word " * 160,
    "split_at_word_ends": "supercalifragilisticexpialidocious " * 25,  # 9 tokens a word
    "phrases_commas_only": "red, green, blue, " * 40,
    "sentence_end_before_phrase_ends": "one two three. " + "alpha, beta gamma, " * 30,
    "blend": '("a red fox", "an oil painting of a blue car in the rain").blend(0.7, 0.3)',
    "blend_no_normalize": '("a red fox", "a car").blend(0.5, 0.25, no_normalize)',
    "and": '("a red fox--", "' + "snowy mountains " * 40 + '").and()',
    "empty": "",
}


# --- the parser ---------------------------------------------------------------------------


COMPEL_PARSER = PromptParser()  # what Compel.parse_prompt_string builds on each call


def compels_parse(prompt: str):
    """compel's PromptParser result as plain tuples: (parts, weights), a part a fragment tuple or a blend."""
    conjunction = COMPEL_PARSER.parse_conjunction(prompt)
    parts = []
    for part in conjunction.prompts:
        if isinstance(part, CompelBlend):
            prompts = tuple(tuple((f.text, f.weight) for f in p.children) for p in part.prompts)
            parts.append(("blend", prompts, tuple(float(w) for w in part.weights), part.normalize_weights))
        else:
            parts.append(tuple((f.text, f.weight) for f in part.children))
    return tuple(parts), tuple(conjunction.weights)


def ours_parse(prompt: str):
    conjunction = parse_prompt(prompt)
    parts = []
    for part in conjunction.prompts:
        if isinstance(part, Blend):
            prompts = tuple(tuple((f.text, f.weight) for f in p) for p in part.prompts)
            parts.append(("blend", prompts, part.weights, part.normalize))
        else:
            parts.append(tuple((f.text, f.weight) for f in part))
    return tuple(parts), tuple(conjunction.weights)


PARSER_CASES = [
    "a (red)1.3 fox++ in the snow--", "((a)1.2 b)0.9 c", "(a b)+++ c---", "word+++foo", "a+b x-y -z",
    "(a)-0.5 b",  # a run of '-' wins over the number, as in compel
    "a(red)1.3", "x,y", "(a = b) c", "(a b).attend(1.2) d", '"a, b"1.2 c', '"a \\"q\\\\"t\\" b"', "w\\(x\\) y",
    '("a", "b").and(1, 0.5)', '("a", b c).blend()', '(a b, c).and()', '("a", "b").blend(0.5, 0.5, no_normalize)',
    '("a cat--", (big dog)1.2, "x y").add(.3, 2, 1)', "()", "a ()", '""0.8 a', "(a:1.3 b)", "a\tb\nc",
]


@pytest.mark.parametrize("prompt", PARSER_CASES)
def test_parse_matches_compels_parser(prompt):
    assert ours_parse(prompt) == compels_parse(prompt) or compels_parse(prompt) == ((), ())


def _generated(rng: random.Random) -> str:
    """A random prompt of compel's building blocks, weights, quotes, escapes and operators."""
    words = ["a", "cat", "red fox", "snow,", "x.y", "blue-ish", "(big)1.2", "tiny--", "huge+", '"soft, warm"0.8',
             "((deep)1.1 sea)0.7", "(a).attend(1.5)", "(b).attend(--)", "w\\(x\\)", "", "1girl", '"q\\"t"', "a+b",
             "(c d)++", "=", "-", ".", "(", ")"]
    flat = " ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
    if rng.random() < 0.6:
        return flat
    targets = ['"' + flat.replace('"', '\\"') + '"', "(" + flat + ")", rng.choice(["a", "cat"])]
    n = rng.randint(1, 3)
    weights = ", ".join(rng.choice(["1", "0.5", ".3", "2", "no_normalize"]) for _ in range(rng.choice([0, n])))
    operator = rng.choice([".and", ".blend", ".add"])
    return "(" + ", ".join(rng.choice(targets) for _ in range(n)) + ")" + operator + "(" + weights + ")"


def test_parse_matches_compels_parser_on_generated_prompts():
    rng = random.Random(0)
    for _ in range(250):  # compel's pyparsing grammar takes ~30 ms a prompt
        prompt = _generated(rng)
        try:
            expected = compels_parse(prompt)
        except Exception:  # noqa: BLE001 -- compel refuses it: so must we
            with pytest.raises(PromptSyntaxError):
                parse_prompt(prompt)
            continue
        if expected != ((), ()):  # compel cannot encode a prompt of nothing; "" here
            assert ours_parse(prompt) == expected, prompt


@pytest.mark.parametrize("a1111, compel", [
    ("a (red fox:1.3) in the snow", "a (red fox)1.3 in the snow"),
    ("((a:1.2) b:0.5) c", "((a)1.2 b)0.5 c"),
    ("(a: .5 ) b", "(a).5 b"),
])
def test_a1111_weights_read_as_compels(a1111, compel):
    assert a1111_to_compel(a1111) == compel
    assert ours_parse(a1111) == compels_parse(compel)


@pytest.mark.parametrize("text", ["x \\(a:1.3\\) y", "time 10:30)", "(a:-1)", "(a:b)"])
def test_text_that_is_no_a1111_weight_is_left_alone(text):
    assert a1111_to_compel(text) == text


@pytest.mark.parametrize("prompt, says", [
    ("a cat.swap(dog)", ".swap()"),
    ("a cat withLora(style, 0.5)", "withLora"),
    ('("a", "b").blend(1, 1) more', "whole prompt"),
    ('("a", "b").blend(1, 2, 3)', "needs as many weights"),
    ('("a", "b").and(foo, 1)', "must be numbers"),
    ("(" * 2000 + "a" + ")" * 2000, "too deeply"),
])
def test_prompts_compel_cannot_read_or_we_do_not_support_are_refused(prompt, says):
    with pytest.raises(PromptSyntaxError, match=says.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_prompt(prompt)


def test_deeply_nested_weights_parse_fast():
    prompt = "(" * 40 + "a" + ")1.1" * 40
    (fragments,), _ = ours_parse(prompt)
    assert fragments == (("a", pytest.approx(1.1 ** 40)),)


# --- embeddings ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def theirs(tiny_model_dir):
    """diffusers' base and refiner pipelines: the components compel runs on, as its users pass them."""
    base = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "refiner", add_watermarker=False)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
        cls, overrides = DIFFUSERS_SCHEDULERS["euler"]  # our pipelines' default scheduler
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    return base, refiner


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    base = SDXLPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)
    refiner = SDXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "refiner", add_watermarker=False)
    return base, refiner


def compel_multi(pipe) -> Compel:
    """compel over both base encoders, configured for SDXL as the issue names it."""
    return Compel(tokenizer=[pipe.tokenizer, pipe.tokenizer_2], text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
                  returned_embeddings_type=PENULTIMATE, requires_pooled=[False, True], truncate_long_prompts=False)


def compel_refiner(pipe, requires_pooled=True) -> Compel:
    return Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2, returned_embeddings_type=PENULTIMATE,
                  requires_pooled=requires_pooled, truncate_long_prompts=False)


def encode(pipe, prompt, syntax="compel", **kwargs):
    return encode_prompt([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2], prompt,
                         force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt, prompt_syntax=syntax,
                         **kwargs)


def assert_close(got: torch.Tensor, want: torch.Tensor):
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("prompt", [p for name, p in WEIGHTED.items() if not name.startswith("blend")],
                         ids=[name for name in WEIGHTED if not name.startswith("blend")])
def test_base_embeddings_equal_compels_over_both_encoders(ours, theirs, prompt):
    embeds, pooled = compel_multi(theirs[0])(prompt)
    got = encode(ours[0], prompt, do_classifier_free_guidance=False)
    assert_close(got.prompt_embeds, embeds)
    assert_close(got.pooled_prompt_embeds, pooled)


def test_a_long_prompt_takes_three_chunks_and_weights_change_it(ours):
    weighted = encode(ours[0], LONG, do_classifier_free_guidance=False).prompt_embeds
    unweighted = encode(ours[0], LONG.replace("(red)1.3", "red").replace("++", "").replace("--", "")
                        .replace("(tall)0.8", "tall"), do_classifier_free_guidance=False).prompt_embeds
    assert weighted.shape == (1, 3 * 77, 80)
    assert (weighted - unweighted).abs().max() > 1e-2


@pytest.mark.parametrize("prompt", WEIGHTED.values(), ids=WEIGHTED.keys())
def test_refiner_embeddings_equal_compels(ours, theirs, prompt):
    embeds, pooled = compel_refiner(theirs[1])(prompt)
    got = encode(ours[1], prompt, do_classifier_free_guidance=False)
    assert_close(got.prompt_embeds, embeds)
    assert_close(got.pooled_prompt_embeds, pooled)


@pytest.mark.parametrize("prompt", [WEIGHTED["blend"], WEIGHTED["blend_no_normalize"]])
def test_base_blends_equal_compel_for_sdxl(ours, theirs, prompt):
    # compel's multi-encoder provider cannot pad a blend's prompts; its SDXL wrapper runs one compel per encoder.
    want = CompelForSDXL(theirs[0])(prompt)
    got = encode(ours[0], prompt, do_classifier_free_guidance=False)
    assert_close(got.prompt_embeds, want.embeds)
    assert_close(got.pooled_prompt_embeds, want.pooled_embeds)


def test_a1111_weight_equals_compels_number_weight(ours, theirs):
    embeds, pooled = compel_multi(theirs[0])("a (red fox)1.3 in the snow")
    got = encode(ours[0], "a (red fox:1.3) in the snow", do_classifier_free_guidance=False)
    assert_close(got.prompt_embeds, embeds)
    assert_close(got.pooled_prompt_embeds, pooled)


def test_weighted_and_equals_compels_parts_weighted_against_the_empty_prompt(ours, theirs):
    # compel with requires_pooled fails on a weighted .and() (it pads its own (embeds, pooled) tuple); the
    # embeddings come from compel without pooling, the pooled from compel's get_pooled_embeddings.
    prompt = '("a red fox--", "' + "snowy mountains " * 40 + '").and(1.5, 0.5)'
    base, refiner = theirs
    parts = [Compel(tokenizer=t, text_encoder=e, returned_embeddings_type=PENULTIMATE, truncate_long_prompts=False)
             for t, e in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2))]
    embeds = torch.cat([compel(prompt) for compel in parts], dim=-1)
    pooled = compel_multi(base).conditioning_provider.get_pooled_embeddings([prompt])
    got = encode(ours[0], prompt, do_classifier_free_guidance=False)
    assert_close(got.prompt_embeds, embeds)
    assert_close(got.pooled_prompt_embeds, pooled)
    assert_close(encode(ours[1], prompt, do_classifier_free_guidance=False).prompt_embeds,
                 compel_refiner(refiner, requires_pooled=False)(prompt))


BASE_CALLS = {
    "negative_longer": dict(prompt="a (red)1.3 fox", negative_prompt="blurry, " * 60),
    "negative_shorter": dict(prompt=LONG, negative_prompt="blurry--"),
    "negative_2": dict(prompt=LONG, negative_prompt="blurry", negative_prompt_2="dark, grainy " * 30),
    "prompt_2_longer": dict(prompt="a red fox", prompt_2="an oil painting, " * 40, negative_prompt="ugly"),
    "prompt_2_shorter": dict(prompt=LONG, prompt_2="an oil painting", negative_prompt="blurry " * 90),
    "batch": dict(prompt=["a red fox++", LONG], negative_prompt=["ugly", "bad " * 90], num_images_per_prompt=2),
    "batch_one_negative": dict(prompt=["a red fox++", LONG], negative_prompt="(ugly)1.2"),
}


def compel_for_sdxl(pipe, prompt, prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                    num_images_per_prompt=1):
    """CompelForSDXL's (embeds, pooled, negative, negative pooled), each prompt's rows repeated."""
    want = CompelForSDXL(pipe)(prompt, prompt_2, negative_prompt, negative_prompt_2)
    fields = (want.embeds, want.pooled_embeds, want.negative_embeds, want.negative_pooled_embeds)
    return [t.repeat_interleave(num_images_per_prompt, dim=0) for t in fields]


@pytest.mark.parametrize("call", BASE_CALLS.values(), ids=BASE_CALLS.keys())
def test_base_prompts_and_negatives_padded_to_one_length_equal_compel_for_sdxl(ours, theirs, call):
    got = encode(ours[0], **call)
    want = compel_for_sdxl(theirs[0], **call)
    for name, expected in zip(("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                               "negative_pooled_prompt_embeds"), want):
        assert_close(getattr(got, name), expected)


def test_without_a_negative_the_base_gets_zeros_of_the_prompts_length(ours, theirs):
    got = encode(ours[0], ["a fox", LONG])
    embeds, pooled = compel_multi(theirs[0])(LONG)
    assert_close(got.prompt_embeds[1:], embeds)
    assert got.negative_prompt_embeds.shape == (2, 3 * 77, 80) and not got.negative_prompt_embeds.any()
    assert not got.negative_pooled_prompt_embeds.any()


def test_without_a_negative_the_refiner_encodes_the_empty_prompt_padded(ours, theirs):
    compel = compel_refiner(theirs[1])
    embeds, pooled = compel([LONG, ""])
    got = encode(ours[1], LONG)
    assert_close(got.prompt_embeds, embeds[:1])
    assert_close(got.negative_prompt_embeds, embeds[1:])
    assert_close(got.negative_pooled_prompt_embeds, pooled[1:])


def test_plain_is_the_default_and_an_unknown_syntax_is_refused(ours):
    base = ours[0]
    default = encode_prompt([base.text_encoder, base.text_encoder_2], [base.tokenizer, base.tokenizer_2], LONG)
    plain = encode(base, LONG, syntax="plain")
    assert default.prompt_embeds.shape == (1, 77, 80) and torch.equal(default.prompt_embeds, plain.prompt_embeds)
    with pytest.raises(ValueError, match="`prompt_syntax` must be one of 'plain', 'compel', got 'a1111'"):
        encode(base, "a", syntax="a1111")


# --- images ---------------------------------------------------------------------------------


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("negative_prompt", [None, "blurry, (ugly)1.2"], ids=["zeros", "negative"])
def test_text2img_equals_diffusers_fed_compels_embeddings(ours, theirs, negative_prompt):
    pipe = theirs[0]
    want = CompelForSDXL(pipe)(LONG, negative_prompt=negative_prompt)
    kwargs = dict(num_inference_steps=4, output_type="np", height=64, width=64)
    expected = pipe(prompt_embeds=want.embeds, pooled_prompt_embeds=want.pooled_embeds,
                    negative_prompt_embeds=want.negative_embeds, negative_pooled_prompt_embeds=want.negative_pooled_embeds,
                    generator=torch.Generator("cpu").manual_seed(41), **kwargs).images
    actual = ours[0](LONG, negative_prompt=negative_prompt, prompt_syntax="compel", seed=41, **kwargs).images
    assert actual.shape == expected.shape == (1, 64, 64, 3)
    assert max_diff(actual, expected) <= IMAGE_TOL
    plain = ours[0](LONG, negative_prompt=negative_prompt, seed=41, **kwargs).images
    assert max_diff(actual, plain) > 1e-3  # the syntax reached the denoiser


def test_refiner_img2img_equals_diffusers_fed_compels_embeddings(ours, theirs):
    pipe, prompt, negative = theirs[1], WEIGHTED["downweight_across_chunks"], "blurry--"
    embeds, pooled = compel_refiner(pipe)([prompt, negative])
    image = np.linspace(0, 1, 64 * 64 * 3).reshape(64, 64, 3)
    kwargs = dict(image=image, strength=0.5, num_inference_steps=6, output_type="np")
    expected = pipe(prompt_embeds=embeds[:1], pooled_prompt_embeds=pooled[:1], negative_prompt_embeds=embeds[1:],
                    negative_pooled_prompt_embeds=pooled[1:], generator=torch.Generator("cpu").manual_seed(42),
                    **kwargs).images
    actual = ours[1](prompt, negative_prompt=negative, prompt_syntax="compel", seed=42, **kwargs).images
    assert max_diff(actual, expected) <= IMAGE_TOL
