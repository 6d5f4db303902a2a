"""SDXL prompt encoding: CLIP-L and bigG penultimate hidden states, bigG's pooled embedding.

Follows `StableDiffusionXLPipeline.encode_prompt` in diffusers 0.42.1
(pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py; the img2img pipeline's
is the same code), without textual inversion or clip_skip. LoRA adapters apply to the encoders through
sdxl_core.lora's hooks, around this call. With prompt_syntax="compel", prompts are read and encoded as compel
does (sdxl_core.weighted_prompts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sdxl_core.weighted_prompts import TOKENIZER_LOCK, encode_weighted

logger = logging.getLogger(__name__)

Prompt = str | list[str]
# "plain": diffusers' reading, cut at 77 tokens. "compel": compel's weights, blends and conjunctions, any length.
PROMPT_SYNTAXES = ("plain", "compel")


@dataclass(frozen=True)
class PromptEmbeddings:
    """The UNet's text conditioning; the negatives are None without classifier-free guidance."""

    prompt_embeds: torch.Tensor  # (B*n, 77k, 2048) for the base, (B*n, 77k, 1280) for the refiner; k = 1 but compel
    pooled_prompt_embeds: torch.Tensor  # (B*n, 1280)
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


def _as_batch(name: str, prompt: Prompt, batch_size: int) -> list[str]:
    prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch_size:
        raise ValueError(
            f"`{name}` has batch size {len(prompts)}, but `prompt` has batch size {batch_size}; "
            f"pass one string, or a list with one entry per prompt"
        )
    return prompts


def _tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (B, 77): BOS, text, EOS, padding; a longer text is cut, with a warning quoting the cut."""
    max_length = tokenizer.model_max_length
    with TOKENIZER_LOCK:
        padded = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        full_ids = tokenizer(prompts, verbose=False).input_ids
    for full in full_ids:
        if len(full) > max_length:
            logger.warning(
                "The following part of your input was truncated because CLIP can only handle sequences up to "
                "%d tokens: %r", max_length, tokenizer.decode(full[max_length - 1 : -1]),
            )
    return padded.input_ids


def _encode(pairs: list, texts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate hidden states of the encoders, concatenated (B, 77, sum C), and the pooled (B, P)."""
    hidden, pooled = [], None
    # zip pairs the refiner's single encoder (bigG) with `prompt`, not `prompt_2`, as diffusers does.
    for (tokenizer, text_encoder), prompts in zip(pairs, texts):
        ids = _tokenize(tokenizer, prompts).to(next(text_encoder.parameters()).device)
        out = text_encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if pooled is None and hasattr(out, "text_embeds"):
            pooled = out.text_embeds  # bigG's projected EOS state
    return torch.cat(hidden, dim=-1), pooled


def _encode_plain(pairs: list, texts: list[list[str]], negative_texts: list[list[str]] | None):
    """diffusers' encoding: each text cut to 77 tokens, positives and negatives apart."""
    embeds, pooled = _encode(pairs, texts)
    negative_embeds, negative_pooled = (None, None) if negative_texts is None else _encode(pairs, negative_texts)
    return embeds, pooled, negative_embeds, negative_pooled


def _encode_compel(pairs: list, texts: list[list[str]], negative_texts: list[list[str]] | None):
    """compel's encoding: prompts and negatives encoded together, so all are padded to the longest (77k tokens)."""
    batch_size = len(texts[0])
    if negative_texts is not None:
        texts = [positives + negatives for positives, negatives in zip(texts, negative_texts)]
    embeds, pooled = encode_weighted(pairs, texts)
    if negative_texts is None:
        return embeds, pooled, None, None
    return embeds[:batch_size], pooled[:batch_size], embeds[batch_size:], pooled[batch_size:]


ENCODINGS = {"plain": _encode_plain, "compel": _encode_compel}


def check_prompt_syntax(prompt_syntax: str) -> None:
    if prompt_syntax not in ENCODINGS:
        raise ValueError(f"`prompt_syntax` must be one of {', '.join(map(repr, PROMPT_SYNTAXES))}, "
                         f"got {prompt_syntax!r}")


@torch.no_grad()
def encode_prompt(
    text_encoders: list,
    tokenizers: list,
    prompt: Prompt,
    prompt_2: Prompt | None = None,
    negative_prompt: Prompt | None = None,
    negative_prompt_2: Prompt | None = None,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
    force_zeros_for_empty_prompt: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    prompt_syntax: str = "plain",
) -> PromptEmbeddings:
    """Encode prompts for the SDXL base ([CLIP-L, bigG]) or the refiner ([None, bigG]).

    `prompt_2` / `negative_prompt_2` feed the base's bigG and default to `prompt` /
    `negative_prompt`; the refiner's bigG reads `prompt` / `negative_prompt`, as in diffusers.
    With `force_zeros_for_empty_prompt` (model_index.json: true for the base, false for
    the refiner) a missing negative prompt gives zeros; otherwise it is encoded as "".
    Results are on `device` in `dtype` (default: bigG's), each prompt's rows repeated
    `num_images_per_prompt` times in a row.

    `prompt_syntax` "plain" reads prompts as diffusers does and cuts them at 77 tokens.
    "compel" reads compel's syntax (`(word)1.3`, `word++`, `word--`, `.blend()`, `.and()`;
    A1111's `(word:1.3)` as `(word)1.3`) and encodes prompts of any length in 77-token chunks
    as compel does for SDXL. Every prompt and negative of the call, and every encoder's text of
    a prompt (a `prompt_2` longer or shorter than `prompt`, as compel's CompelForSDXL reads a
    style prompt), is padded with the empty prompt's chunks to the longest, so all share one
    length 77k; the zeros of a missing negative take that length too.
    """
    check_prompt_syntax(prompt_syntax)
    pairs = [(tok, enc) for tok, enc in zip(tokenizers, text_encoders, strict=True) if enc is not None]
    if not pairs or not hasattr(pairs[-1][1], "text_projection"):
        raise ValueError("text_encoders must end with bigG (CLIPTextModelWithProjection): it gives the pooled embedding")
    if isinstance(prompt, str) or (prompt and all(isinstance(p, str) for p in prompt)):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    else:
        raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}")
    batch_size = len(prompts)
    if not (isinstance(num_images_per_prompt, int) and num_images_per_prompt >= 1):
        raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt!r}")
    texts = [prompts, _as_batch("prompt_2", prompt_2 or prompt, batch_size)]

    zeros = do_classifier_free_guidance and negative_prompt is None and force_zeros_for_empty_prompt
    negative_texts = None
    if do_classifier_free_guidance and not zeros:
        negative_prompt = negative_prompt or ""
        negative_texts = [
            _as_batch("negative_prompt", negative_prompt, batch_size),
            _as_batch("negative_prompt_2", negative_prompt_2 or negative_prompt, batch_size),
        ]
    embeds, pooled, negative_embeds, negative_pooled = ENCODINGS[prompt_syntax](pairs, texts, negative_texts)
    if zeros:
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)

    bigg = pairs[-1][1]
    device, dtype = device or bigg.device, dtype or bigg.dtype

    def per_image(x):  # diffusers' repeat(1, n, 1).view(B * n, ...) is this row order
        return None if x is None else x.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0)

    return PromptEmbeddings(*map(per_image, (embeds, pooled, negative_embeds, negative_pooled)))
