"""The orchestrator: validates a Generate, chains the stages, relays their progress. It holds no model.

Tensors pass through as the stages send them (chunks renamed, never decoded), so the chain
EncodePrompt -> [Vae.Encode] -> base Denoise -> [refiner Denoise] -> Vae.Decode gives exactly the
images of SDXLPipeline(seed=S, denoising_end=f, output_type="latent") then
SDXLImg2ImgPipeline(seed=S, image=latents, denoising_start=f): every stage gets the same seed.
Inpainting, both are SDXLInpaintPipeline and the refiner gets the base's mask with its latents.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import grpc

from sdxl.v1 import (
    denoiser_pb2,
    denoiser_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    stage_pb2,
    stage_pb2_grpc,
    tensor_pb2,
    text_encoder_pb2,
    text_encoder_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)
from sdxl_core.request import REFINER_STRENGTH, is_inpainting_unet, needs_image_latents
from sdxl_wire.tensors import packed

from . import tracing
from .auth import with_token
from .calls import call_options, remaining_timeout
from .channels import stage_channel
from .generate_params import ENSEMBLE, INPAINT, NONE, REFINE, TEXT2IMG, Generate, Limits, read_generate
from .server import Server, ServerOptions
from .tls import ChannelTls

SERVICE = "sdxl.v1.Orchestrator"
# It only waits on stages, so many Generates may be in flight; the stages' own queues bound the work.
OPTIONS = ServerOptions(max_concurrency=64, max_queue=64)
Stage = orchestrator_pb2.Stage
# A stage call is a pure function of its inputs and seed, so one whose replica was lost (UNAVAILABLE: killed,
# draining, unreachable) or full (RESOURCE_EXHAUSTED: another replica may have room) runs again on another
# replica and gives the same result. At most this many times per call:
MAX_RETRIES = 2
READY_WAIT_S = 3.0  # before running a call again, wait this long at most for a replica of its stage to be ready
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
RESTARTED = object()  # Reservation.responses() yields it before the responses of a call run again
log = logging.getLogger("sdxl.orchestrator")

class InFlight:
    """The stage calls of one Generate; all cancelled when the Generate ends early (client gone, deadline)."""

    def __init__(self, context: grpc.ServicerContext):
        self._lock = threading.Lock()
        self._calls: list[grpc.Future] = []
        self._ended = False
        self.ended = threading.Event()
        if not context.add_callback(self.cancel):
            self.cancel()

    def track(self, call):
        with self._lock:
            self._calls.append(call)
            if self._ended:
                call.cancel()
        return call

    def cancel(self) -> None:
        self.ended.set()
        with self._lock:
            self._ended = True
            for call in self._calls:
                call.cancel()  # a no-op on a finished call


class Reservation:
    """A Denoise call opened before its inputs exist: the stage admits it, or refuses it, before any other stage
    spends time on the request. `send` gives it its messages once they are there; they are kept, so that a call
    whose replica is lost can be opened again on another one and sent them again."""

    def __init__(self, run: Run, name: str, stub: denoiser_pb2_grpc.DenoiserStub):
        self.run, self.name, self.stub = run, name, stub
        self.span = tracing.LongCall(name, "Denoise")
        self.sent: list | None = None
        self.attempt = 0
        self._messages: queue.SimpleQueue | None = None
        self._open()

    def _open(self) -> None:
        """Open the call and wait for Admitted; a refusal or a lost replica opens it again elsewhere, or aborts."""
        while True:
            if self._messages is not None:
                self._messages.put(None)  # let the abandoned call's request thread go
            self._messages = queue.SimpleQueue()
            if self.sent is not None:
                self._put(self.sent)
            with self.span.current():
                self.call = self.run.calls.track(
                    self.stub.Denoise(self._requests(self._messages), **call_options(self.run.context)))
            try:
                next(self.call)  # Admitted
                return
            except grpc.RpcError as error:
                self.attempt = self.run.retry(self.name, error, self.attempt)

    def _requests(self, messages: queue.SimpleQueue) -> Iterator[denoiser_pb2.DenoiseRequest]:
        while not self.run.calls.ended.is_set():  # the Generate ended before sending: let grpc's reader go
            try:
                message = messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if message is None:
                return
            yield message

    def _put(self, messages: list) -> None:
        for message in messages:
            self._messages.put(message)
        self._messages.put(None)

    def send(self, messages: Iterable[denoiser_pb2.DenoiseRequest]) -> None:
        self.sent = list(messages)
        self._put(self.sent)

    def responses(self) -> Iterator:
        """The call's responses after Admitted; RESTARTED, then a new call's, each time it runs again."""
        while True:
            try:
                yield from self.call
                self.span.end()
                return
            except grpc.RpcError as error:
                self.attempt = self.run.retry(self.name, error, self.attempt)
            self._open()
            yield RESTARTED


def _renamed(chunks: Iterable[tensor_pb2.TensorChunk], names: dict[str, str]) -> Iterator[tensor_pb2.TensorChunk]:
    """The chunks whose names are in `names`, under their new names."""
    for chunk in chunks:
        if chunk.name in names:
            out = tensor_pb2.TensorChunk()
            out.CopyFrom(chunk)
            out.name = names[chunk.name]
            yield out


def _progress(stage: int, step: int, total: int = 1, preview=None) -> orchestrator_pb2.GenerateResponse:
    return orchestrator_pb2.GenerateResponse(
        progress=orchestrator_pb2.GenerateProgress(stage=stage, step=step, total=total, preview=preview))


PROMPT_NAMES = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


class Run:
    """One Generate's chain of stage calls; each method yields GenerateResponses."""

    def __init__(self, stubs: Stubs, request: Generate, context: grpc.ServicerContext):
        self.stubs, self.request, self.context = stubs, request, context
        self.calls = InFlight(context)

    def stage_call(self, name: str, method: Callable, requests: Callable[[], object]) -> list:
        """A stage's responses, all of them: the call runs again, `requests()` sent again, where Run.retry says;
        otherwise its error passes through with its code and the stage named."""
        attempt = 0
        while True:
            with tracing.client_span(name, method):
                call = self.calls.track(method(requests(), **call_options(self.context)))
                try:
                    return list(call)
                except grpc.RpcError as error:
                    failed = error
            attempt = self.retry(name, failed, attempt)

    def retry(self, name: str, error: grpc.RpcError, attempt: int) -> int:
        """Return attempt + 1 once a replica of stage `name` is ready to run a failed call again; abort instead
        if the error is not a lost or full replica, the retries are spent, the Generate is over, or no replica
        is ready within READY_WAIT_S."""
        remaining = remaining_timeout(self.context)
        wait = READY_WAIT_S if remaining is None else min(READY_WAIT_S, remaining)
        if error.code() not in RETRIED or attempt >= MAX_RETRIES or self.calls.ended.is_set() or wait <= 0:
            self.stage_failed(name, error)
        if name == "base" and error.code() == grpc.StatusCode.UNAVAILABLE:
            self.stubs.base_info.forget()  # the next replica may hold other weights
        log.warning("%s stage: %s (%s); running the call again (retry %d of %d)", name, error.code().name,
                    error.details(), attempt + 1, MAX_RETRIES)
        ready = grpc.channel_ready_future(self.stubs.channel(name))
        try:
            ready.result(timeout=wait)
        except grpc.FutureTimeoutError:
            ready.cancel()
            self.context.abort(grpc.StatusCode.UNAVAILABLE,
                               f"{name} stage: no replica ready {wait:.1f} s after {error.details()}")
        return attempt + 1

    def stage_failed(self, name: str, error: grpc.RpcError):
        """Abort with the stage's code and message, the stage named."""
        if name == "base" and error.code() == grpc.StatusCode.UNAVAILABLE:
            self.stubs.base_info.forget()
        self.context.abort(error.code(), f"{name} stage: {error.details()}")

    def base_model(self) -> stage_pb2.StageDescription:
        """The base stage's description: Vae.Encode computes in its dtype and, for an inpainting UNet,
        also encodes the masked image, so that the seed's draws are the in-process pipeline's."""
        try:
            return self.stubs.base_info.get(**call_options(self.context))
        except grpc.RpcError as error:
            self.stage_failed("base", error)

    def responses(self) -> Iterator[orchestrator_pb2.GenerateResponse]:
        p = self.request.params
        # A place at the denoisers first: a request they would refuse costs no text-encoder or VAE time.
        base = Reservation(self, "base", self.stubs.base)
        refiner = Reservation(self, "refiner", self.stubs.refiner) if p.refiner != NONE else None
        yield _progress(Stage.STAGE_ENCODE_PROMPT, 0)
        prompts = self.encode_prompt()
        yield _progress(Stage.STAGE_ENCODE_PROMPT, 1)
        images, base_header = [], self.base_header()
        if p.mode != TEXT2IMG:
            yield _progress(Stage.STAGE_ENCODE_IMAGE, 0)
            for response in self.encode_image():
                if response.HasField("draws"):  # the VAE's seeded draws, for the base to skip
                    base_header.encode_draws.CopyFrom(response.draws)
                images.extend(response.chunks)
            yield _progress(Stage.STAGE_ENCODE_IMAGE, 1)
        latents = []
        yield from self.denoise(Stage.STAGE_BASE, base, base_header, _renamed(prompts, _prefixed("base")), images,
                                latents)
        if p.refiner != NONE:
            # The refiner starts from the base's latents as they are (no encode, no draws of the VAE's to skip);
            # inpainting, it blends with them under the base's mask, as SDXLInpaintPipeline given latents does.
            base_latents = list(_renamed(latents, {"latents": "image_latents"}))
            if p.mode == INPAINT:
                base_latents += _renamed(images, {"mask": "mask"})
            latents = []
            yield from self.denoise(Stage.STAGE_REFINER, refiner, self.refiner_header(),
                                    _renamed(prompts, _prefixed("refiner")), base_latents, latents)
        yield _progress(Stage.STAGE_DECODE, 0)
        yield from self.decode(latents)
        yield _progress(Stage.STAGE_DECODE, 1)
        yield orchestrator_pb2.GenerateResponse(
            result=orchestrator_pb2.GenerateResult(seed=self.request.seed, num_images=self.request.batch_size))

    def encode_prompt(self) -> list[tensor_pb2.TensorChunk]:
        p = self.request.params
        targets = [text_encoder_pb2.TARGET_BASE] + ([text_encoder_pb2.TARGET_REFINER] if p.refiner != NONE else [])
        request = text_encoder_pb2.EncodePromptRequest(
            prompt=p.prompt, prompt_2=p.prompt_2, negative_prompt=p.negative_prompt,
            negative_prompt_2=p.negative_prompt_2, targets=targets, num_images_per_prompt=p.num_images_per_prompt,
            guided=self.request.guidance_scale > 1, priority=p.priority, prompt_syntax=p.prompt_syntax,
            loras=p.loras, refiner_loras=p.refiner_loras)
        responses = self.stage_call("text_encoder", self.stubs.text_encoder.EncodePrompt, lambda: request)
        return [chunk for response in responses for chunk in response.chunks]

    def encode_image(self) -> list[vae_pb2.EncodeResponse]:
        p, base = self.request.params, self.base_model()
        in_channels = base.unet.in_channels
        header = vae_pb2.EncodeHeader(
            priority=p.priority, seed=self.request.seed, height=p.height, width=p.width, batch_size=self.request.batch_size,
            masked_image_latents=p.mode == INPAINT and is_inpainting_unet(in_channels), dtype=base.dtype,
            skip_image_latents=not needs_image_latents(in_channels, self.request.from_pure_noise()))
        messages = [vae_pb2.EncodeRequest(header=header)]
        messages += [vae_pb2.EncodeRequest(image=c) for c in self.request.images]
        messages += [vae_pb2.EncodeRequest(mask_image=c) for c in self.request.masks]
        return self.stage_call("vae", self.stubs.vae.Encode, lambda: iter(messages))

    def base_header(self) -> denoiser_pb2.DenoiseHeader:
        p = self.request.params
        header = self._header(p.scheduler, p.num_inference_steps)
        header.height, header.width = p.height, p.width
        header.loras.extend(p.loras)
        for name in ("denoising_start", "strength"):
            if p.HasField(name):
                setattr(header, name, getattr(p, name))
        if p.refiner == ENSEMBLE:
            header.denoising_end = self.request.high_noise_frac
        elif p.HasField("denoising_end"):
            header.denoising_end = p.denoising_end
        return header

    def refiner_header(self) -> denoiser_pb2.DenoiseHeader:
        p = self.request.params
        if p.refiner == ENSEMBLE:  # the same schedule, from the base's cut
            header = self._header(p.scheduler, p.num_inference_steps)
            header.denoising_start = self.request.high_noise_frac
        else:
            assert p.refiner == REFINE  # img2img on the base's latents: unset strength is the refiner's default
            header = self._header(p.refiner_scheduler or p.scheduler, p.refiner_steps or p.num_inference_steps)
            header.strength = p.refiner_strength if p.HasField("refiner_strength") else REFINER_STRENGTH
        header.loras.extend(p.refiner_loras)
        return header

    def _header(self, scheduler: str, steps: int) -> denoiser_pb2.DenoiseHeader:
        p = self.request.params
        header = denoiser_pb2.DenoiseHeader(
            scheduler=scheduler, num_inference_steps=steps, guidance_scale=self.request.guidance_scale,
            guidance_rescale=p.guidance_rescale, seed=self.request.seed, micro_conditioning=p.micro_conditioning,
            preview=p.preview, priority=p.priority)
        if p.HasField("scheduler_options"):
            header.scheduler_options.CopyFrom(p.scheduler_options)
        return header

    def denoise(self, stage: int, reservation: Reservation, header, prompts: Iterable, tensors: Iterable,
                latents: list) -> Iterator:
        """The reserved Denoise call, sent its messages; its progress relayed, its latents chunks appended to
        `latents`. Run again on another replica, its progress starts again and its latents replace those so far."""
        reservation.send(_with_header(denoiser_pb2.DenoiseRequest, header, itertools.chain(prompts, tensors)))
        for response in reservation.responses():
            if response is RESTARTED:
                latents.clear()
            elif response.WhichOneof("event") == "progress":
                progress = response.progress
                preview = progress.preview if progress.HasField("preview") else None
                yield _progress(stage, progress.step, progress.total, preview)
            else:
                latents.append(response.chunk)

    def decode(self, latents: list) -> Iterator[orchestrator_pb2.GenerateResponse]:
        p = self.request.params
        header = vae_pb2.DecodeHeader(output_format=p.output_format, priority=p.priority)
        if p.HasField("watermark"):
            header.watermark = p.watermark
        messages = _with_header(vae_pb2.DecodeRequest, header, latents)
        # Whole before any goes out: a call run again sends its images again, and the client must see them once.
        for response in self.stage_call("vae", self.stubs.vae.Decode, lambda: iter(messages)):
            if response.WhichOneof("payload") == "image":
                yield orchestrator_pb2.GenerateResponse(image=response.image)
            else:
                yield orchestrator_pb2.GenerateResponse(chunk=response.chunk)


def _with_header(message: type, header, chunks: Iterable) -> list:
    """A header-and-chunks request stream: the header and the first chunks on one message, the rest packed."""
    groups = packed(chunks)
    return [message(header=header, chunks=next(groups)), *(message(chunks=group) for group in groups)]


def _prefixed(target: str) -> dict[str, str]:
    return {f"{target}/{name}": name for name in PROMPT_NAMES}


class Described:
    """A stage's StageInfo.Describe answer: asked when first needed, and again once older than `max_age_s` or
    after a call to the stage failed UNAVAILABLE (a replica went away; the next may hold other weights)."""

    def __init__(self, channel: grpc.Channel, max_age_s: float = 30.0):
        self.stub = stage_pb2_grpc.StageInfoStub(channel)
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._description: stage_pb2.StageDescription | None = None
        self._asked_at = 0.0

    def get(self, **call_options) -> stage_pb2.StageDescription:
        with self._lock:
            if self._description is not None and time.monotonic() - self._asked_at < self.max_age_s:
                return self._description
        description = self.stub.Describe(stage_pb2.DescribeRequest(), **call_options)
        with self._lock:
            self._description, self._asked_at = description, time.monotonic()
        return description

    def forget(self) -> None:
        with self._lock:
            self._description = None


class Stubs:
    """One channel per stage, shared by every Generate."""

    def __init__(self, text_encoder: str, base: str, refiner: str | None, vae: str, max_message_bytes: int,
                 tls: ChannelTls | None = None, token: str | None = None):
        self.channels = [with_token(stage_channel(a, max_message_bytes, tls), token)
                         for a in (text_encoder, base, vae)]
        self.base_info = Described(self.channels[1])  # what Vae.Encode must know of the base's UNet
        self.text_encoder = text_encoder_pb2_grpc.TextEncoderStub(self.channels[0])
        self.base = denoiser_pb2_grpc.DenoiserStub(self.channels[1])
        self.vae = vae_pb2_grpc.VaeStub(self.channels[2])
        self.refiner = None
        if refiner:
            self.channels.append(with_token(stage_channel(refiner, max_message_bytes, tls), token))
            self.refiner = denoiser_pb2_grpc.DenoiserStub(self.channels[-1])

    def channel(self, stage: str) -> grpc.Channel:
        """The channel to the replicas of `stage`."""
        return self.channels[("text_encoder", "base", "vae", "refiner").index(stage)]

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    """Generate: read and check the request, then run the chain of stage calls."""

    def __init__(self, stubs: Stubs, limits: Limits = Limits()):
        self.stubs, self.limits = stubs, limits

    def Generate(self, request_iterator, context) -> Iterator[orchestrator_pb2.GenerateResponse]:
        request = read_generate(request_iterator, self.limits, has_refiner=self.stubs.refiner is not None)
        yield from Run(self.stubs, request, context).responses()


def build(
    text_encoder: str,
    base: str,
    refiner: str | None,
    vae: str,
    address: str = "[::]:0",
    options: ServerOptions = OPTIONS,
    limits: Limits = Limits(),
    stage_tls: ChannelTls | None = None,
    stage_token: str | None = None,
) -> Server:
    """A started, SERVING orchestrator over the stages at these addresses ("h1:p1,h2:p2" or "dns:///name:port"),
    calling them over TLS with `stage_tls` and sending them `stage_token` (auth.py) when given."""
    stubs = Stubs(text_encoder, base, refiner, vae, options.max_message_bytes, stage_tls, stage_token)
    handler = (orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, OrchestratorServicer(stubs, limits))
    server = Server("orchestrator", [handler], [SERVICE], address, options, on_stop=stubs.close)
    server.start()
    server.set_serving()
    return server
