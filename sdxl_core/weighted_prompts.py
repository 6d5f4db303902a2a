"""Prompts of any length with compel's weights: token ids and weights in 77-token chunks, and their embeddings.

Follows compel 2.5.1 (compel/embeddings_provider.py and compel/compel.py) as SDXL uses it: penultimate hidden
states, not truncated (truncate_long_prompts=False), long texts split at sentence, else phrase, else word ends,
downweighting by masking (DownweightMode.MASK). Each chunk is BOS, up to 75 tokens, EOS, padding; the chunks'
hidden states are concatenated on the sequence axis. A weight w multiplies a token's offset from the empty
prompt's hidden state at its position; a fragment of weight w < 1 is also pulled, by tan((1 - w) * pi / 2), towards
the prompt with that fragment masked out. The pooled embedding is bigG's over the prompt's text as written,
truncated to 77 tokens, as compel's get_pooled_embeddings gives it.
"""

from __future__ import annotations

import math
import threading

import torch

from sdxl_core.prompt_syntax import Blend, Conjunction, FlattenedPrompt, Fragment, a1111_to_compel, parse_prompt

SENTENCE_ENDS = (".</w>",)
PHRASE_ENDS = (".</w>", ",</w>", ";</w>", ":</w>")
WORD_END = "</w>"
MIN_WEIGHT = 1e-5  # a fragment's weight 0 would pull by tan(pi / 2)

# A fast tokenizer keeps its padding / truncation settings on the shared Rust object and each call
# resets them: two threads tokenizing at once can get each other's settings. Tokenizing is cheap.
# sdxl_core.prompts tokenizes under the same lock.
TOKENIZER_LOCK = threading.Lock()


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids without BOS / EOS, of any length (compel's get_token_ids without markers)."""
    with TOKENIZER_LOCK:
        ids = tokenizer(texts, truncation=False, padding="do_not_pad", verbose=False).input_ids
    out = []
    for row in ids:
        row = row[1:] if row and row[0] == tokenizer.bos_token_id else row
        out.append(row[:-1] if row and row[-1] == tokenizer.eos_token_id else row)
    return out


def split_point(tokenizer, ids: list[int], max_length: int) -> int:
    """How many of `ids` the next chunk takes: through the last sentence end in reach, else phrase end, else word
    end, else `max_length` (compel's SplitLongTextMode.SENTENCES and its fallbacks)."""
    if len(ids) <= max_length:
        return max_length
    tokens = tokenizer.convert_ids_to_tokens(ids[:max_length])
    for ends in (SENTENCE_ENDS, PHRASE_ENDS):
        found = [i for i, token in enumerate(tokens) if token in ends]
        if found:
            return found[-1] + 1
    found = [i for i, token in enumerate(tokens) if token.endswith(WORD_END)]
    return found[-1] + 1 if found else max_length


def chunked(tokenizer, ids: list[int], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (77k,) as chunks of BOS, text, EOS, padding, and each token's weight (77k,), markers 1."""
    size, bos, eos = tokenizer.model_max_length, [tokenizer.bos_token_id], [tokenizer.eos_token_id]
    all_ids, all_weights = [], []
    while True:
        n = split_point(tokenizer, ids, size - 2)
        pad = size - 2 - len(ids[:n])
        all_ids += bos + ids[:n] + eos + [tokenizer.pad_token_id] * pad
        all_weights += [1.0] + weights[:n] + [1.0] + [1.0] * pad
        ids, weights = ids[n:], weights[n:]
        if not ids:
            return torch.tensor(all_ids), torch.tensor(all_weights, dtype=torch.float32)


def fragment_ranges(tokenizer, ids: list[int], fragment_ids: list[list[int]]) -> list[tuple[int, int] | None]:
    """Each fragment's first and last position in the chunked `ids`, stepping over chunk markers between its
    tokens; None for a fragment without tokens (compel's _get_token_ranges_for_fragments)."""
    markers = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    ranges, start = [], 0
    for fragment in fragment_ids:
        if not fragment:
            ranges.append(None)
            continue
        while ids[start] != fragment[0]:
            start += 1
        end, matched = start, 0
        while True:
            if ids[end] == fragment[matched]:
                matched += 1
                if matched == len(fragment):
                    break
            elif ids[end] not in markers:
                raise RuntimeError(f"token mismatch for fragment {fragment} at position {end}")
            end += 1
        ranges.append((start, end))
        start = end + 1
    return ranges


class Encoder:
    """One text encoder and its tokenizer, turning parsed prompts into compel's embeddings (L, D).

    Holds the empty prompt's hidden state once computed: make one per encode call, not one per model.
    """

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.size = tokenizer.model_max_length
        self._empty: torch.Tensor | None = None

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Penultimate hidden states (n, 77, D) of chunks (n, 77)."""
        device = next(self.text_encoder.parameters()).device
        mask = None if mask is None else mask.to(device)
        return self.text_encoder(ids.to(device), mask, output_hidden_states=True).hidden_states[-2]

    @property
    def empty(self) -> torch.Tensor:
        """The hidden state (77, D) of "": BOS, EOS, padding (compel's empty_z), without an attention mask."""
        if self._empty is None:
            t = self.tokenizer
            ids = [t.bos_token_id, t.eos_token_id] + [t.pad_token_id] * (self.size - 2)
            self._empty = self.hidden(torch.tensor([ids]), None)[0]
        return self._empty

    def pad(self, embeds: torch.Tensor, length: int) -> torch.Tensor:
        """(L, D) -> (length, D), the empty prompt's chunk appended (compel's pad_conditioning_tensors_to_same_length)."""
        chunks = (length - embeds.shape[0]) // self.size
        return torch.cat([embeds] + [self.empty.to(embeds.dtype)] * chunks)

    def weighted(self, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Chunks' hidden states (n, 77, D) weighted: empty + (h - empty) * w, where a chunk's weights are not all 1;
        the chunks concatenated (77n, D) (compel's build_weighted_embedding_tensor)."""
        out = []
        for h, w in zip(hidden, weights.view(-1, self.size, 1).to(hidden.device)):
            identity = (w == 1).expand(h.shape)
            out.append(h if identity.all() else torch.where(identity, h, self.empty + (h - self.empty) * w))
        return torch.cat(out)

    def flattened(self, prompt: FlattenedPrompt) -> torch.Tensor:
        """A flattened prompt's embeddings (77k, D): weights > 1 scale, weights < 1 also lerp towards the prompt
        without the fragment (compel's get_embeddings_for_weighted_prompt_fragments)."""
        prompt = prompt or (Fragment(""),)
        fragment_ids = token_ids(self.tokenizer, [f.text for f in prompt])
        ids = [i for row in fragment_ids for i in row]
        weights = [f.weight for f, row in zip(prompt, fragment_ids) for _ in row]
        ids, weights = chunked(self.tokenizer, ids, weights)
        masks = [torch.ones_like(ids)]
        lerp = [1.0]
        for fragment, span in zip(prompt, fragment_ranges(self.tokenizer, ids.tolist(), fragment_ids)):
            if fragment.weight < 1:
                masks.append(self.masked(masks[0], span))
                lerp.append(math.tan((1.0 - max(MIN_WEIGHT, fragment.weight)) * math.pi / 2))
        chunks = ids.view(-1, self.size)
        hidden = self.hidden(chunks.repeat(len(masks), 1), torch.cat([m.view(-1, self.size) for m in masks]))
        embeds = torch.stack([self.weighted(h, weights) for h in hidden.split(chunks.shape[0])])
        return apply_embedding_weights(embeds, lerp, normalize=True).to(self.text_encoder.dtype)

    def masked(self, mask: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
        """`mask` with a fragment's positions zeroed, but each chunk's first and last position kept."""
        mask = mask.clone()
        if span is not None:
            mask[span[0] : span[1] + 1] = 0
            mask[0 :: self.size] = 1
            mask[self.size - 1 :: self.size] = 1
        return mask

    def blend(self, blend: Blend) -> torch.Tensor:
        """A blend's prompts, padded to one length, mixed by its weights (compel's _get_conditioning_for_blend)."""
        embeds = self.padded([self.flattened(p) for p in blend.prompts])
        return apply_embedding_weights(torch.stack(embeds), list(blend.weights), blend.normalize)

    def conjunction(self, conjunction: Conjunction) -> torch.Tensor:
        """The parts' embeddings concatenated on the sequence axis, a part of weight w taken as
        empty + (part - empty) * w against "" (compel's build_conditioning_tensor_for_conjunction)."""
        parts = []
        for part, weight in zip(conjunction.prompts, conjunction.weights):
            embeds = self.blend(part) if isinstance(part, Blend) else self.flattened(part)
            if weight != 1:
                empty = self.pad(self.flattened((Fragment(""),)), embeds.shape[0])
                embeds = empty + (embeds - empty) * weight
            parts.append(embeds)
        return torch.cat(parts)

    def padded(self, embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        length = max(e.shape[0] for e in embeds)
        return [self.pad(e, length) for e in embeds]

    def pooled(self, texts: list[str]) -> torch.Tensor:
        """bigG's pooled embeddings (B, P) of the texts as written, cut to 77 tokens (compel's get_pooled_embeddings)."""
        t = self.tokenizer
        ids = [[t.bos_token_id] + row[: self.size - 2] + [t.eos_token_id] for row in token_ids(t, texts)]
        ids = torch.tensor([row + [t.pad_token_id] * (self.size - len(row)) for row in ids])
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device)).text_embeds


def apply_embedding_weights(embeds: torch.Tensor, weights: list[float], normalize: bool) -> torch.Tensor:
    """Σ w_i embeds_i over embeds (n, L, D), w normalized to sum 1 if asked (compel's apply_embedding_weights)."""
    w = torch.tensor(weights, dtype=embeds.dtype, device=embeds.device)
    if normalize:
        w = w / torch.sum(w)
    return torch.sum(embeds.unsqueeze(0) * w.reshape(-1, 1, 1), dim=1)[0]


def prompt_size(tokenizer, text: str) -> tuple[int, int]:
    """What encoding `text` costs with one encoder: (its 77-token chunks, the 77-token sequences the encoder runs:
    each flattened prompt's chunks once, and once more per fragment weighted below 1)."""
    conjunction, size = parse_prompt(text), tokenizer.model_max_length
    chunks = rows = 0
    for part, weight in zip(conjunction.prompts, conjunction.weights):
        prompts = part.prompts if isinstance(part, Blend) else (part,)
        counts = []
        for prompt in prompts:
            prompt = prompt or (Fragment(""),)
            ids = [i for row in token_ids(tokenizer, [f.text for f in prompt]) for i in row]
            counts.append(chunked(tokenizer, ids, [1.0] * len(ids))[0].numel() // size)
            rows += counts[-1] * (1 + sum(f.weight < 1 for f in prompt))
        chunks += max(counts)
        rows += weight != 1  # the "" it is weighted against
    return chunks, rows


@torch.no_grad()
def encode_weighted(pairs: list, texts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """compel's embeddings of B prompts (B, 77k, sum D) and bigG's pooled (B, P), each encoder reading its list of
    `texts` (pairs [(tokenizer, text_encoder), ...] ending with bigG; a list per pair, B texts each).

    Every row, and each encoder's part of a row (a different `prompt_2` may be longer or shorter), is padded to the
    longest with the empty prompt's chunks, as compel pads prompts and their negatives to one length.
    """
    encoders = [Encoder(tokenizer, text_encoder) for tokenizer, text_encoder in pairs]
    parsed = {text: parse_prompt(text) for row in texts[: len(encoders)] for text in row}
    per_encoder = [[e.conjunction(parsed[text]) for text in row] for e, row in zip(encoders, texts)]
    length = max(x.shape[0] for rows in per_encoder for x in rows)
    embeds = torch.stack([torch.cat([e.pad(x, length) for e, x in zip(encoders, row)], dim=-1)
                          for row in zip(*per_encoder)])
    bigg_texts = texts[len(encoders) - 1]
    return embeds, encoders[-1].pooled([a1111_to_compel(text) for text in bigg_texts])
