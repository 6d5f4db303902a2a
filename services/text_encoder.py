"""The text-encoder stage: prompts -> the base's and the refiner's embeddings (sdxl_core.prompts.encode_prompt).

An engine (services/engine.py) owns the encoders: each iteration it encodes the prompts of every call that can
share an encode_prompt call with the lead call (same targets, guidance, zero negatives or not, and prompt syntax)
in one, then splits the embeddings back per call. Plain prompts pad to 77 tokens, so rows do not see each other;
compel prompts pad to the longest of the encode, so a compel call is encoded alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdxl.v1 import stage_pb2, text_encoder_pb2, text_encoder_pb2_grpc
from sdxl_core.loading import load_single_file, load_text_encoder
from sdxl_core.loading.folder import read_json
from sdxl_core.loading.hub import model_folder
from sdxl_core.lora import Loras, applied
from sdxl_core.prompts import PromptEmbeddings, check_prompt_syntax, encode_prompt
from sdxl_core.tokenizers import load_tokenizer
from sdxl_core.weighted_prompts import prompt_size
from sdxl_wire.tensors import DTYPES, packed_chunks, wire_dtype

from . import calls, metrics
from .engine import Engine, Job, priority
from .errors import FailedPrecondition
from .loras import CACHE_SIZE as LORA_CACHE
from .loras import LoraLibrary, adapter_key
from .server import Server, ServerOptions

SERVICE = "sdxl.v1.TextEncoder"
add_servicer = text_encoder_pb2_grpc.add_TextEncoderServicer_to_server
# The engine encodes the calls it holds together; a waiting call holds only its strings, so both bounds are deep.
OPTIONS = ServerOptions(max_concurrency=64, max_queue=64)
MAX_BATCH = 64  # prompts x num_images_per_prompt: far above any UNet batch, bounds the work of one call
MAX_ROWS = 64  # prompts in one encode (--max-batch-rows): 64 x 77 tokens is a small forward on any device
TARGET_NAMES = {text_encoder_pb2.TARGET_BASE: "base", text_encoder_pb2.TARGET_REFINER: "refiner"}
# compel prompts: the context a UNet attends to grows with a prompt (16 chunks: 1200 tokens), and each fragment
# weighted below 1 costs another pass over its prompt; a call's passes are bounded like MAX_ROWS plain prompts.
MAX_PROMPT_CHUNKS = 16
MAX_COMPEL_ROWS = 4 * MAX_ROWS


@dataclass(frozen=True)
class Prompts:
    """One EncodePrompt call's strings, one per prompt in each list, with the defaults encode_prompt fills in
    (prompt_2: prompt; negative_prompt: ""; negative_prompt_2: negative_prompt), so that lists concatenate."""

    prompt: list[str]
    prompt_2: list[str]
    negative_prompt: list[str]
    negative_prompt_2: list[str]
    num_images_per_prompt: int
    guided: bool
    zeros: bool  # guided without a negative prompt: a model that forces zeros for empty prompts sends zeros
    targets: tuple[int, ...]
    prompt_syntax: str = "plain"
    adapters: dict[int, Loras] = field(default_factory=dict)  # target -> the loaded LoRA adapters and weights

    @classmethod
    def of(cls, request: text_encoder_pb2.EncodePromptRequest, targets: list[int],
           adapters: dict[int, Loras]) -> Prompts:
        """A checked request's strings; `x or default` as encode_prompt has it, so a lone "" takes the default."""
        prompt, batch = list(request.prompt), len(request.prompt)
        prompt_2 = _one_or_list(request.prompt_2) or prompt
        negative = _one_or_list(request.negative_prompt) or ""
        negative_2 = _one_or_list(request.negative_prompt_2) or negative
        return cls(prompt, _per_prompt(prompt_2, batch), _per_prompt(negative, batch), _per_prompt(negative_2, batch),
                   request.num_images_per_prompt or 1, request.guided, request.guided and not request.negative_prompt,
                   tuple(targets), request.prompt_syntax or "plain", adapters)

    @property
    def key(self) -> tuple:
        """Calls of one key share one encode_prompt call per target."""
        loras = tuple((target, frozenset(self.adapters[target].items())) for target in self.targets)
        return self.targets, self.guided, self.zeros, self.prompt_syntax, loras

    @property
    def joins(self) -> bool:
        """Whether other calls may share this one's encode: compel pads every prompt of an encode to the longest,
        which would change a call's length."""
        return self.prompt_syntax == "plain"

    @property
    def rows(self) -> int:
        return len(self.prompt)


@dataclass(frozen=True)
class Encoders:
    """One model's text encoders: [CLIP-L, bigG] for the base, [None, bigG] for the refiner."""

    text_encoders: list
    tokenizers: list
    force_zeros_for_empty_prompt: bool
    device: torch.device
    dtype: torch.dtype
    loras: LoraLibrary

    def encode(self, calls: list[Prompts], loras: Loras | None = None) -> list[PromptEmbeddings]:
        """encode_prompt once over the prompts of `calls` (of one key), as the in-process pipelines call it for
        each alone, split back per call and each prompt's rows repeated num_images_per_prompt times."""
        lead = calls[0]
        prompt, prompt_2, negative, negative_2 = (
            [text for call in calls for text in getattr(call, name)]
            for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"))
        zeros = lead.zeros and self.force_zeros_for_empty_prompt
        with applied(loras):
            joined = encode_prompt(
                self.text_encoders, self.tokenizers, prompt, prompt_2, None if zeros else negative, negative_2, 1,
                lead.guided, self.force_zeros_for_empty_prompt, device=self.device, dtype=self.dtype,
                prompt_syntax=lead.prompt_syntax)
        parts = [None if t is None else t.split([call.rows for call in calls]) for t in vars(joined).values()]
        return [PromptEmbeddings(*(None if p is None else p[i].repeat_interleave(call.num_images_per_prompt, dim=0)
                                   for p in parts)) for i, call in enumerate(calls)]


def _per_prompt(value: str | list[str], batch: int) -> list[str]:
    return [value] * batch if isinstance(value, str) else list(value)


def _one_or_list(values) -> str | list[str] | None:
    """Empty -> None (the default), one string -> that string for every prompt, else the list."""
    return None if not values else values[0] if len(values) == 1 else list(values)


def load_encoders(path: str | Path, device: str = "cpu", dtype: str = "float32", lora_dir: str | Path | None = None,
                  lora_cache: int = LORA_CACHE) -> Encoders:
    """The text encoders and tokenizers of a diffusers folder or an original single file, nothing else, and the
    adapters of `lora_dir` for them."""
    torch_dtype = DTYPES[dtype]
    if Path(path).is_file():
        c = load_single_file(path, torch_dtype=torch_dtype, device=device)
        encoders, tokenizers, zeros = [c.text_encoder, c.text_encoder_2], [c.tokenizer, c.tokenizer_2], \
            c.force_zeros_for_empty_prompt
    else:
        root = model_folder(path)
        index = read_json(root / "model_index.json", "not a diffusers pipeline folder")
        encoders, tokenizers = [], []
        for suffix in ("", "_2"):
            listed = isinstance(index.get(f"text_encoder{suffix}"), list) and index[f"text_encoder{suffix}"][0]
            encoders.append(load_text_encoder(root / f"text_encoder{suffix}", torch_dtype, device=device)
                            if listed else None)
            tokenizers.append(load_tokenizer(root / f"tokenizer{suffix}") if listed else None)
        zeros = index.get("force_zeros_for_empty_prompt", True)
    loras = LoraLibrary(lora_dir, {"text_encoder": encoders[0], "text_encoder_2": encoders[1]}, lora_cache)
    return Encoders(encoders, tokenizers, zeros, torch.device(device), torch_dtype, loras)


def check_request(request: text_encoder_pb2.EncodePromptRequest, available: dict[int, Encoders]) -> list[int]:
    """The request's targets, after checking prompts, batch sizes and targets; ValueError names the field."""
    batch = len(request.prompt)
    if batch == 0:
        raise ValueError("`prompt` must hold at least one string")
    for name in ("prompt_2", "negative_prompt", "negative_prompt_2"):
        n = len(getattr(request, name))
        if n not in (0, 1, batch):
            raise ValueError(f"`{name}` has {n} strings, but `prompt` has {batch}; send none, one, or {batch}")
    n = request.num_images_per_prompt
    if n < 0 or batch * max(n, 1) > MAX_BATCH:
        raise ValueError(f"len(prompt) * num_images_per_prompt must be in 1..{MAX_BATCH}, got {batch} * {n}")
    targets = list(request.targets)
    if not targets or len(set(targets)) != len(targets) or not set(targets) <= set(TARGET_NAMES):
        raise ValueError(f"`targets` must list TARGET_BASE and/or TARGET_REFINER, each once; got {targets}")
    for target in targets:
        if target not in available:
            name = text_encoder_pb2.Target.Name(target)
            raise FailedPrecondition(f"{name} requested, but this text encoder serves no {TARGET_NAMES[target]} model")
    check_prompt_syntax(request.prompt_syntax or "plain")
    if request.prompt_syntax == "compel":
        check_compel_prompts(request, available[targets[0]].tokenizers[-1])
    return targets


def check_compel_prompts(request: text_encoder_pb2.EncodePromptRequest, tokenizer) -> None:
    """Each prompt parses, fits MAX_PROMPT_CHUNKS chunks, and all take at most MAX_COMPEL_ROWS encoder passes;
    ValueError names the field."""
    rows = 0
    for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
        texts = getattr(request, name)
        for text in texts:
            try:
                chunks, passes = prompt_size(tokenizer, text)
            except ValueError as error:
                raise ValueError(f"`{name}`: {error}") from None
            if chunks > MAX_PROMPT_CHUNKS:
                raise ValueError(f"`{name}` is {chunks} chunks of 77 tokens long; at most {MAX_PROMPT_CHUNKS}")
            rows += passes * (len(request.prompt) if len(texts) == 1 else 1)  # one string serves every prompt
    if rows > MAX_COMPEL_ROWS:
        raise ValueError(f"the prompts take {rows} text-encoder passes of 77 tokens, at most {MAX_COMPEL_ROWS}: "
                         f"shorten them, or weight fewer fragments below 1")


class TextEncoderEngine(Engine):
    """Each iteration, one encode_prompt per target over the lead call and the calls of its key that fit in
    `max_rows` prompts."""

    def __init__(self, encoders: dict[int, Encoders], policy: str = "batch", max_rows: int | None = None):
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_rows}")
        self.encoders, self.max_rows = encoders, max_rows or MAX_ROWS
        super().__init__("text_encoder", policy)

    @torch.no_grad()
    def iterate(self, jobs: list[Job]) -> None:
        lead = jobs[0].work
        batch, rows = [], 0
        for job in jobs:
            if not batch or (job.work.key == lead.key and lead.joins and rows + job.work.rows <= self.max_rows):
                batch.append(job)
                rows += job.work.rows
        for job in batch:
            self.serve(job)
        tensors = [{} for _ in batch]
        for target in lead.targets:
            encodings = self.encoders[target].encode([job.work for job in batch], lead.adapters[target])
            for out, embeddings in zip(tensors, encodings):
                out.update({f"{TARGET_NAMES[target]}/{name}": t for name, t in vars(embeddings).items()
                            if t is not None})
        metrics.observe_forward(self.stage, rows)
        for job, out in zip(batch, tensors):
            job.finish(out)


class TextEncoderServicer(text_encoder_pb2_grpc.TextEncoderServicer):
    """EncodePrompt over the loaded encoders of each target, which the engine's worker alone runs."""

    def __init__(self, encoders: dict[int, Encoders], policy: str = "batch", max_batch_rows: int | None = None):
        self.encoders = encoders
        self.engine = TextEncoderEngine(encoders, policy, max_batch_rows)

    def describe(self) -> stage_pb2.StageDescription:
        base = self.encoders[text_encoder_pb2.TARGET_BASE]
        return stage_pb2.StageDescription(
            model_kind="text_encoder", dtype=wire_dtype(base.dtype), device=str(base.device),
            targets=[TARGET_NAMES[t] for t in self.encoders], limits=stage_pb2.StageLimits(max_images=MAX_BATCH))

    def live_description(self) -> stage_pb2.StageDescription:
        """The adapters in --lora-dir now."""
        return stage_pb2.StageDescription(loras=self.encoders[text_encoder_pb2.TARGET_BASE].loras.names())

    def EncodePrompt(self, request, context) -> Iterator[text_encoder_pb2.EncodePromptResponse]:
        """Checked here; encoded on the engine's worker with the calls it holds; the tensors relayed from here."""
        targets = check_request(request, self.encoders)
        requested = {text_encoder_pb2.TARGET_BASE: request.loras,
                     text_encoder_pb2.TARGET_REFINER: request.refiner_loras}
        # loaded before any work: an unknown adapter is the caller's error
        adapters = {t: self.encoders[t].loras.resolve(adapter_key(requested[t])) for t in targets}
        prompts = Prompts.of(request, targets, adapters)
        metrics.observe_batch("text_encoder", "EncodePrompt", prompts.rows * prompts.num_images_per_prompt)
        job = self.engine.submit(Job(prompts, priority(request.priority), calls.deadline(context),
                                     calls.watch(context)))
        for _, tensors in self.engine.events(job):  # no progress: the one event is the result
            for chunks in packed_chunks(tensors):
                yield text_encoder_pb2.EncodePromptResponse(chunks=chunks)

    def close(self) -> None:
        self.engine.stop()


def load_servicer(model: str | Path, refiner_model: str | Path | None = None, device: str = "cpu",
                  dtype: str = "float32", lora_dir: str | Path | None = None, lora_cache: int = LORA_CACHE,
                  **engine) -> TextEncoderServicer:
    """The base's (and the refiner's) text encoders, with the adapters of `lora_dir`; `engine`: policy and
    max_batch_rows."""
    encoders = {text_encoder_pb2.TARGET_BASE: load_encoders(model, device, dtype, lora_dir, lora_cache)}
    if refiner_model is not None:
        encoders[text_encoder_pb2.TARGET_REFINER] = load_encoders(refiner_model, device, dtype, lora_dir, lora_cache)
    return TextEncoderServicer(encoders, **engine)


def make_server(servicer: TextEncoderServicer, address: str = "[::]:0", options: ServerOptions = OPTIONS) -> Server:
    """A started, SERVING TextEncoder server over a servicer whose encoders are loaded."""
    server = Server("text_encoder", [(add_servicer, servicer)], [SERVICE], address, options, on_stop=servicer.close)
    server.start()
    server.set_serving(servicer.describe(), servicer.live_description)
    return server


def build(
    model: str | Path,
    refiner_model: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    address: str = "[::]:0",
    options: ServerOptions = OPTIONS,
    **engine,
) -> Server:
    """Load the base's (and the refiner's) text encoders and return a started, SERVING server."""
    return make_server(load_servicer(model, refiner_model, device, dtype, **engine), address, options)
