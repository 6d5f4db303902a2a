"""Random well-formed and malformed requests to every service come back with a known status, never INTERNAL or
UNKNOWN; the stages stay SERVING and a valid request succeeds after them.

Examples run one at a time against the shared tiny stages (concurrent calls would share forwards and change
other tests' pixel-exact results), with small shapes and few steps so the whole file takes about a minute.
"""

import io

import grpc
import numpy as np
import PIL.Image
import pytest
import torch
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdxl.v1 import (
    denoiser_pb2,
    denoiser_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    tensor_pb2,
    text_encoder_pb2,
    text_encoder_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)
from sdxl_core.schedulers import SCHEDULERS
from sdxl_wire.tensors import TensorAssembler, to_proto_chunks

# As test_orchestrator: the shared stages' engine threads must start under one thread for its pixel-exact checks.
pytestmark = pytest.mark.usefixtures("one_thread")

KNOWN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
         grpc.StatusCode.UNAVAILABLE}
WAIT_S = 60
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
OPTION_KEYS = sorted({key for sampler in SCHEDULERS.values() for key in sampler.defaults} | {"bogus", ""})
WIRE_DTYPES = [tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16, tensor_pb2.DTYPE_BFLOAT16,
               tensor_pb2.DTYPE_FLOAT64, tensor_pb2.DTYPE_INT64, tensor_pb2.DTYPE_UINT8, 0, 99]
SIDES = [0, 8, 16, 24, 64, 72, 7, -8, 2056, 4096, 8192, 2**31 - 1]  # pixels: small valid ones, and refusals


# --- strategies: each example draws a fault rate, and each field a good value or, at that rate, an odd one


class Pick:
    """Draws a field's value: from `good`, or at the example's fault rate from `bad`."""

    def __init__(self, draw):
        self.draw, self.rate = draw, draw(st.sampled_from([0, 0, 5, 20, 60]))  # percent

    def faulty(self) -> bool:
        return self.draw(st.integers(0, 99)) < self.rate

    def __call__(self, good, bad=()):
        has_bad = isinstance(bad, st.SearchStrategy) or len(bad) > 0
        options = bad if has_bad and self.faulty() else good
        return self.draw(options if isinstance(options, st.SearchStrategy) else st.sampled_from(options))


ODD_FLOATS = [-1.0, 1.5, 1e9, float("nan"), float("inf"), -float("inf")]
GOOD_OPTIONS = {"timestep_spacing": ["linspace", "leading", "trailing"], "steps_offset": [0, 1],
                "prediction_type": ["epsilon", "v_prediction"], "use_karras_sigmas": [True, False],
                "num_train_timesteps": [1000, 500], "beta_schedule": ["linear", "scaled_linear"],
                "beta_start": [0.0001, 0.00085], "eta": [0.0, 0.5]}
ODD_OPTIONS = st.one_of(
    st.none(), st.booleans(), st.sampled_from([-2, -1, 0, 1, 2, 3, 999, 1000, 10_000, 10**9, 10**12]),
    st.sampled_from(ODD_FLOATS), st.sampled_from(["linear", "karras", ""]),
    st.lists(st.sampled_from([0.5, 0.001, 2, -1, "x"]), max_size=3))


def scheduler_options(pick: Pick, scheduler: str) -> struct_pb2.Struct:
    options = struct_pb2.Struct()
    accepted = sorted(SCHEDULERS.get(scheduler or "euler", SCHEDULERS["euler"]).defaults)
    for _ in range(pick.draw(st.integers(0, 2))):
        key = pick(sorted(GOOD_OPTIONS.keys() & set(accepted)) or accepted, [*OPTION_KEYS])
        options[key] = pick(GOOD_OPTIONS.get(key, ODD_OPTIONS), ODD_OPTIONS)
    return options


def tensor_chunks(pick: Pick, name: str, good: np.ndarray) -> list[tensor_pb2.TensorChunk]:
    """The chunks of `good`; or of it with NaN or infinity in it, in another dtype or shape; or malformed chunks."""
    kind = pick(["good"], ["poisoned", "recast", "reshaped", "malformed"])
    array = good.copy()
    if kind == "poisoned" and array.size and array.dtype.kind == "f":
        array.flat[pick.draw(st.integers(0, array.size - 1))] = pick(ODD_FLOATS[3:])
    elif kind == "recast":
        array = array.astype(pick([np.float16, np.float64, np.int64, np.uint8]))
    elif kind == "reshaped":
        array = np.zeros(pick.draw(st.lists(st.integers(0, 4), max_size=5)), array.dtype)
    elif kind == "malformed":
        return [tensor_pb2.TensorChunk(name=pick([name, "", "other"]), dtype=pick(WIRE_DTYPES),
                                       shape=pick.draw(st.lists(st.sampled_from([0, 1, 4, 2**40]), max_size=4)),
                                       offset=pick([0, 0, 4, 2**40]), data=pick.draw(st.binary(max_size=64)))]
    return list(to_proto_chunks(name, torch.from_numpy(array)))


def stream_of(pick: Pick, first, rest: list, message) -> list:
    """`first` then `rest`; at the fault rate reordered, cut or doubled: malformed streams."""
    shape = pick(["as is"], ["shuffled", "empty", "headless", "two headers"])
    if shape == "shuffled":
        return pick.draw(st.permutations([first, *rest]))
    return {"as is": [first, *rest], "empty": [], "headless": rest or [message()],
            "two headers": [first, first, *rest]}[shape]


def code_of(call) -> grpc.StatusCode:
    """The status code of a call, run to its end."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            for _ in result:
                pass
    except grpc.RpcError as exc:
        assert exc.code() in KNOWN, f"{exc.code()}: {exc.details()}"
        assert "Traceback" not in (exc.details() or "")
        return exc.code()
    return grpc.StatusCode.OK


def assert_serving(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- fixtures: channels and one valid request of each kind


@pytest.fixture(scope="module")
def channels(stages, orchestrator_address):
    addresses = {**stages, "orchestrator": orchestrator_address}
    opened = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.fixture(scope="module")
def embeddings(channels) -> dict[str, np.ndarray]:
    """The text encoder's guided embeddings of one prompt for the base."""
    request = text_encoder_pb2.EncodePromptRequest(prompt=["a red cube"], targets=[text_encoder_pb2.TARGET_BASE],
                                                   guided=True)
    assembler = TensorAssembler()
    stub = text_encoder_pb2_grpc.TextEncoderStub(channels["text_encoder"])
    for response in stub.EncodePrompt(request, timeout=WAIT_S):
        for chunk in response.chunks:
            assembler.add(chunk)
    return Tensors({name.split("/")[-1]: t.numpy() for name, t in assembler.finish().items()})


class Tensors(dict):
    """A dict whose repr stays short in Hypothesis' reports."""

    def __repr__(self) -> str:
        return f"Tensors({', '.join(f'{k}: {v.shape}' for k, v in self.items())})"


def _png(side: tuple[int, int], mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new(mode, (side[1], side[0]), 128).save(buffer, format=fmt)
    return buffer.getvalue()


def _piece(data: bytes, index: int = 0) -> tensor_pb2.ImageChunk:
    return tensor_pb2.ImageChunk(index=index, total_bytes=len(data), offset=0, data=data)


def _denoise_valid(channels, embeddings) -> None:
    header = denoiser_pb2.DenoiseHeader(num_inference_steps=2, height=64, width=64, seed=1)
    messages = [denoiser_pb2.DenoiseRequest(header=header)]
    messages += [denoiser_pb2.DenoiseRequest(chunks=list(to_proto_chunks(name, torch.from_numpy(t))))
                 for name, t in embeddings.items()]
    assert code_of(lambda: denoiser_pb2_grpc.DenoiserStub(channels["base"]).Denoise(iter(messages), timeout=WAIT_S)) \
        == grpc.StatusCode.OK


def _after(stages, orchestrator_address, valid) -> None:
    for address in [*stages.values(), orchestrator_address]:
        assert_serving(address)
    valid()


# --- the services


ODD_TEXTS = st.lists(st.one_of(st.sampled_from(["", " ", "\x00", "猫" * 300]), st.text(max_size=40)), max_size=3)


def texts(pick: Pick, counts: list[int]) -> list[str]:
    """`counts` good prompts, or at the fault rate odd ones."""
    if pick.faulty():
        return pick.draw(ODD_TEXTS)
    n = pick(counts)
    return pick.draw(st.lists(st.sampled_from(["a cat", "a red cube"]), min_size=n, max_size=n))


@st.composite
def prompt_requests(draw) -> text_encoder_pb2.EncodePromptRequest:
    pick = Pick(draw)
    return text_encoder_pb2.EncodePromptRequest(
        prompt=texts(pick, [1, 2]), prompt_2=texts(pick, [0]), negative_prompt=texts(pick, [0, 1]),
        targets=pick([[1], [2], [1, 2]], [[], [0], [1, 1], [3], [-1]]),
        num_images_per_prompt=pick([0, 1, 2], [-1, 1000, 2**31 - 1]), guided=draw(st.booleans()),
        priority=pick([0, 2], [-1, 4]))


@settings(FUZZ, max_examples=30)
@given(request=prompt_requests())
def test_encode_prompt(channels, request):
    stub = text_encoder_pb2_grpc.TextEncoderStub(channels["text_encoder"])
    code_of(lambda: stub.EncodePrompt(request, timeout=WAIT_S))


def test_encode_prompt_leaves_the_stage_serving(stages, orchestrator_address, channels):
    request = text_encoder_pb2.EncodePromptRequest(prompt=["a cat"], targets=[text_encoder_pb2.TARGET_BASE])
    stub = text_encoder_pb2_grpc.TextEncoderStub(channels["text_encoder"])
    _after(stages, orchestrator_address, lambda: list(stub.EncodePrompt(request, timeout=WAIT_S)))


def set_floats(pick: Pick, message, names: dict[str, list[float]]) -> None:
    """Set some of the optional float fields `names` to one of their good values or an odd one."""
    for name, good in names.items():
        if pick.draw(st.booleans()):
            setattr(message, name, pick(good, ODD_FLOATS))


@st.composite
def denoise_streams(draw, embeddings) -> list[denoiser_pb2.DenoiseRequest]:
    pick = Pick(draw)
    header = denoiser_pb2.DenoiseHeader(
        scheduler=pick([*SCHEDULERS, ""], ["bogus"]), num_inference_steps=pick([1, 2, 3], [0, -1, 1001, 2**31 - 1]),
        guidance_rescale=pick([0.0, 0.7], ODD_FLOATS), height=pick([0, 16, 64], SIDES), width=pick([0, 24, 64], SIDES),
        preview=draw(st.booleans()), priority=pick([0, 1, 3], [-1, 4]))
    header.scheduler_options.CopyFrom(scheduler_options(pick, header.scheduler))
    set_floats(pick, header, {"guidance_scale": [1.0, 5.0], "denoising_end": [0.8]})
    if draw(st.booleans()):
        header.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        mc = header.micro_conditioning
        mc.original_size.height, mc.original_size.width = pick([(64, 64)], [(0, 0), (-1, 8), (2**31 - 1, 1)])
        mc.crops_coords_top_left.top = pick([0, 8], [-(2**31), 2**31 - 1])
        mc.aesthetic_score = pick([6.0], ODD_FLOATS)
    side = pick([(8, 8), (4, 6)], [(3, 5), (1, 1), (0, 8), (1000, 1000)])
    tensors = dict(embeddings.items())
    mode = draw(st.sampled_from(["text2img", "text2img", "latents", "img2img", "inpaint"]))
    latents = {"latents": ["latents"], "img2img": ["image_latents"], "inpaint": ["image_latents", "mask"]}
    for name in latents.get(mode, []) + pick([[]], [["masked_image_latents"], ["latents", "mask"]]):
        tensors[name] = np.zeros((1, 1 if name == "mask" else 4, *side), np.float32)
    if mode in ("img2img", "inpaint") or pick.faulty():
        set_floats(pick, header, {"denoising_start": [0.5], "strength": [0.3, 1.0]})
    for name in pick([[]], [[n] for n in sorted(tensors)]):
        del tensors[name]
    if pick([False], [True]):  # an empty batch
        tensors = {name: t[:0] for name, t in tensors.items()}
    rest = [denoiser_pb2.DenoiseRequest(chunks=tensor_chunks(pick, name, t)) for name, t in sorted(tensors.items())]
    return stream_of(pick, denoiser_pb2.DenoiseRequest(header=header), rest, denoiser_pb2.DenoiseRequest)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_denoise(channels, embeddings, data):
    stream = data.draw(denoise_streams(embeddings))
    code_of(lambda: denoiser_pb2_grpc.DenoiserStub(channels["base"]).Denoise(iter(stream), timeout=WAIT_S))


def test_denoise_leaves_the_stage_serving(stages, orchestrator_address, channels, embeddings):
    _after(stages, orchestrator_address, lambda: _denoise_valid(channels, embeddings))


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_decode(channels, data):
    pick = Pick(data.draw)
    header = vae_pb2.DecodeHeader(output_format=pick([0, 1, 2], [-1, 3]), priority=pick([0, 2], [-1, 4]),
                                  watermark=pick([False], [True]))
    shape = pick([(1, 4, 8, 8), (2, 4, 3, 5)],
                 [(1, 4, 1, 1), (0, 4, 8, 8), (1, 4, 0, 8), (1, 3, 8, 8), (1, 4, 400, 400)])
    chunks = tensor_chunks(pick, pick(["latents"], ["other"]), np.zeros(shape, np.float32))
    stream = stream_of(pick, vae_pb2.DecodeRequest(header=header), [vae_pb2.DecodeRequest(chunks=chunks)],
                       vae_pb2.DecodeRequest)
    code_of(lambda: vae_pb2_grpc.VaeStub(channels["vae"]).Decode(iter(stream), timeout=WAIT_S))


def test_decode_leaves_the_stage_serving(stages, orchestrator_address, channels):
    chunks = list(to_proto_chunks("latents", torch.zeros(1, 4, 8, 8)))
    stream = [vae_pb2.DecodeRequest(header=vae_pb2.DecodeHeader(watermark=False)), vae_pb2.DecodeRequest(chunks=chunks)]
    stub = vae_pb2_grpc.VaeStub(channels["vae"])
    _after(stages, orchestrator_address, lambda: list(stub.Decode(iter(stream), timeout=WAIT_S)))


IMAGE_SIDES = [(64, 64), (16, 24), (8, 8), (7, 64), (1, 1), (2112, 64), (64, 2056)]


def encoded_images(pick: Pick, mode: str, side: tuple[int, int]) -> list[tensor_pb2.ImageChunk]:
    kind = pick(["png", "jpeg"], ["bytes", "truncated", "gif"])
    side = pick([side], IMAGE_SIDES)
    if kind == "bytes":
        data = pick.draw(st.binary(min_size=1, max_size=64))
    else:
        data = _png(side, mode, {"gif": "GIF", "jpeg": "JPEG"}.get(kind, "PNG"))
        data = data[: len(data) // 2] if kind == "truncated" else data
    pieces = [_piece(data, index) for index in range(pick([1, 2]))]
    if pick.faulty():  # a gap in the indexes, or a chunk that does not follow on
        pieces[-1] = tensor_pb2.ImageChunk(index=pick([3, 0]), total_bytes=len(data), offset=pick([0, 5]), data=data)
    return pieces


@st.composite
def encode_streams(draw) -> list[vae_pb2.EncodeRequest]:
    pick = Pick(draw)
    header = vae_pb2.EncodeHeader(
        height=pick([0, 16, 64], SIDES), width=pick([0, 24, 64], SIDES), batch_size=pick([1, 2], [-1, 0, 3]),
        masked_image_latents=draw(st.booleans()), dtype=pick([0, 1], WIRE_DTYPES),
        skip_image_latents=pick([False], [True]), priority=pick([0, 2], [-1, 4]))
    if draw(st.booleans()):
        header.height = header.width = 0  # the image's own size
    side = pick([(16, 16), (64, 48)])
    rest = []
    if pick([True], [False]):
        rest += [vae_pb2.EncodeRequest(image=p) for p in encoded_images(pick, "RGB", side)]
    else:
        shape = pick([(1, *side, 3)], [(1, 1, 1, 3), (0, 16, 16, 3), (1, 0, 0, 3), (1, 16, 16)])
        rest += [vae_pb2.EncodeRequest(chunk=c) for c in tensor_chunks(pick, "image", np.full(shape, 128, np.uint8))]
    if draw(st.booleans()):
        rest += [vae_pb2.EncodeRequest(mask_image=p) for p in encoded_images(pick, "L", side)]
    return stream_of(pick, vae_pb2.EncodeRequest(header=header), rest, vae_pb2.EncodeRequest)


@settings(FUZZ, max_examples=80)
@given(stream=encode_streams())
def test_encode(channels, stream):
    code_of(lambda: vae_pb2_grpc.VaeStub(channels["vae"]).Encode(iter(stream), timeout=WAIT_S))


def test_encode_leaves_the_stage_serving(stages, orchestrator_address, channels):
    stream = [vae_pb2.EncodeRequest(header=vae_pb2.EncodeHeader(seed=1)),
              vae_pb2.EncodeRequest(image=_piece(_png((16, 16))))]
    stub = vae_pb2_grpc.VaeStub(channels["vae"])
    _after(stages, orchestrator_address, lambda: list(stub.Encode(iter(stream), timeout=WAIT_S)))


@st.composite
def generate_streams(draw) -> list[orchestrator_pb2.GenerateRequest]:
    pick = Pick(draw)
    mode = pick([0, 1, 2], [-1, 4])
    params = orchestrator_pb2.GenerateParams(
        mode=mode, prompt=texts(pick, [1]), negative_prompt=texts(pick, [0, 1]),
        num_inference_steps=pick([1, 2], [-1, 201]), guidance_rescale=pick([0.0], ODD_FLOATS),
        height=pick([64, 0] if mode == 0 else [0], [8, 72, 4096, 63]),
        width=pick([64, 0] if mode == 0 else [0], [2056]),
        num_images_per_prompt=pick([0, 1], [2, 9, -1]), scheduler=pick(["", "ddim", "dpmpp_2m"], ["x"]),
        refiner=pick([0, 1, 2], [-1, 3]), refiner_steps=pick([0, 1], [1000]), output_format=pick([0, 1], [-1, 2]),
        priority=pick([0], [-1, 4]), watermark=False)
    params.scheduler_options.CopyFrom(scheduler_options(pick, params.scheduler))
    set_floats(pick, params, {"guidance_scale": [1.0, 5.0], "denoising_start": [0.5], "denoising_end": [0.8],
                              "strength": [0.5], "high_noise_frac": [0.8], "refiner_strength": [0.3]})
    rest = []
    if mode in (1, 2) or pick.faulty():
        rest += [orchestrator_pb2.GenerateRequest(image=p) for p in encoded_images(pick, "RGB", (64, 64))]
    if mode == 2 or pick.faulty():
        rest += [orchestrator_pb2.GenerateRequest(mask_image=p) for p in encoded_images(pick, "L", (64, 64))]
    return stream_of(pick, orchestrator_pb2.GenerateRequest(params=params), rest, orchestrator_pb2.GenerateRequest)


@settings(FUZZ, max_examples=80)
@given(stream=generate_streams())
def test_generate(channels, stream):
    stub = orchestrator_pb2_grpc.OrchestratorStub(channels["orchestrator"])
    code_of(lambda: stub.Generate(iter(stream), timeout=WAIT_S))


def test_generate_leaves_every_stage_serving(stages, orchestrator_address, channels):
    params = orchestrator_pb2.GenerateParams(prompt=["a cat"], height=64, width=64, num_inference_steps=2, seed=1,
                                             watermark=False)
    stub = orchestrator_pb2_grpc.OrchestratorStub(channels["orchestrator"])
    request = orchestrator_pb2.GenerateRequest(params=params)
    _after(stages, orchestrator_address, lambda: list(stub.Generate(iter([request]), timeout=WAIT_S)))
