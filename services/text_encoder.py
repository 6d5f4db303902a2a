"""The text-encoder stage: prompts -> the base's and the refiner's embeddings (sdxl_core.prompts.encode_prompt)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl.v1 import stage_pb2, text_encoder_pb2, text_encoder_pb2_grpc
from sdxl_core.loading import load_single_file, load_text_encoder
from sdxl_core.loading.folder import read_json
from sdxl_core.loading.hub import model_folder
from sdxl_core.prompts import PromptEmbeddings, encode_prompt
from sdxl_core.tokenizers import load_tokenizer
from sdxl_wire.tensors import DTYPES, packed_chunks, wire_dtype

from . import metrics
from .errors import FailedPrecondition
from .server import Server, ServerOptions

SERVICE = "sdxl.v1.TextEncoder"
add_servicer = text_encoder_pb2_grpc.add_TextEncoderServicer_to_server
MAX_BATCH = 64  # prompts x num_images_per_prompt: far above any UNet batch, bounds the work of one call
TARGET_NAMES = {text_encoder_pb2.TARGET_BASE: "base", text_encoder_pb2.TARGET_REFINER: "refiner"}


@dataclass(frozen=True)
class Encoders:
    """One model's text encoders: [CLIP-L, bigG] for the base, [None, bigG] for the refiner."""

    text_encoders: list
    tokenizers: list
    force_zeros_for_empty_prompt: bool
    device: torch.device
    dtype: torch.dtype

    def encode(self, request: text_encoder_pb2.EncodePromptRequest) -> PromptEmbeddings:
        """encode_prompt with the request's prompts, as the in-process pipelines call it."""
        return encode_prompt(
            self.text_encoders, self.tokenizers, list(request.prompt), _one_or_list(request.prompt_2),
            _one_or_list(request.negative_prompt), _one_or_list(request.negative_prompt_2),
            request.num_images_per_prompt or 1, request.guided, self.force_zeros_for_empty_prompt,
            device=self.device, dtype=self.dtype,
        )


def _one_or_list(values) -> str | list[str] | None:
    """Empty -> None (the default), one string -> that string for every prompt, else the list."""
    return None if not values else values[0] if len(values) == 1 else list(values)


def load_encoders(path: str | Path, device: str = "cpu", dtype: str = "float32") -> Encoders:
    """The text encoders and tokenizers of a diffusers folder or an original single file, nothing else."""
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
    return Encoders(encoders, tokenizers, zeros, torch.device(device), torch_dtype)


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
    return targets


class TextEncoderServicer(text_encoder_pb2_grpc.TextEncoderServicer):
    """EncodePrompt over the loaded encoders of each target."""

    def __init__(self, encoders: dict[int, Encoders]):
        self.encoders = encoders

    def describe(self) -> stage_pb2.StageDescription:
        base = self.encoders[text_encoder_pb2.TARGET_BASE]
        return stage_pb2.StageDescription(
            model_kind="text_encoder", dtype=wire_dtype(base.dtype), device=str(base.device),
            targets=[TARGET_NAMES[t] for t in self.encoders], limits=stage_pb2.StageLimits(max_images=MAX_BATCH))

    def EncodePrompt(self, request, context) -> Iterator[text_encoder_pb2.EncodePromptResponse]:
        tensors = {}
        for target in check_request(request, self.encoders):
            embeddings = self.encoders[target].encode(request)
            tensors.update({f"{TARGET_NAMES[target]}/{name}": tensor for name, tensor in vars(embeddings).items()
                            if tensor is not None})
        metrics.observe_batch("text_encoder", "EncodePrompt", embeddings.prompt_embeds.shape[0])
        for chunks in packed_chunks(tensors):
            yield text_encoder_pb2.EncodePromptResponse(chunks=chunks)


def load_servicer(model: str | Path, refiner_model: str | Path | None = None, device: str = "cpu",
                  dtype: str = "float32") -> TextEncoderServicer:
    """The base's (and the refiner's) text encoders."""
    encoders = {text_encoder_pb2.TARGET_BASE: load_encoders(model, device, dtype)}
    if refiner_model is not None:
        encoders[text_encoder_pb2.TARGET_REFINER] = load_encoders(refiner_model, device, dtype)
    return TextEncoderServicer(encoders)


def build(
    model: str | Path,
    refiner_model: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    address: str = "[::]:0",
    options: ServerOptions = ServerOptions(),
) -> Server:
    """Load the base's (and the refiner's) text encoders and return a started, SERVING server."""
    servicer = load_servicer(model, refiner_model, device, dtype)
    server = Server("text_encoder", [(add_servicer, servicer)], [SERVICE], address, options)
    server.start()
    server.set_serving(servicer.describe())
    return server
