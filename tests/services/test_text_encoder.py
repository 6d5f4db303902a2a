"""The text-encoder stage: embeddings bit-equal to the pipelines', bad requests refused with the right code."""

import math
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdxl.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from sdxl_core.pipelines import SDXLImg2ImgPipeline, SDXLPipeline
from sdxl_services import text_encoder
from sdxl_wire import CHUNK_BYTES
from tests.services import test_text_encoder_engine as engine
from tests.wire.streams import assemble

BASE, REFINER = text_encoder_pb2.TARGET_BASE, text_encoder_pb2.TARGET_REFINER


@pytest.fixture(scope="module")
def pipelines(tiny_model_dir):
    return SDXLPipeline.from_pretrained(tiny_model_dir / "base"), SDXLImg2ImgPipeline.from_pretrained(
        tiny_model_dir / "refiner")


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    both = text_encoder.build(tiny_model_dir / "base", tiny_model_dir / "refiner")
    base_only = text_encoder.build(tiny_model_dir / "base")
    yield both, base_only
    both.stop(0)
    base_only.stop(0)


def _stub(server):
    return text_encoder_pb2_grpc.TextEncoderStub(grpc.insecure_channel(f"localhost:{server.port}"))


def _encode(server, **fields) -> dict[str, torch.Tensor]:
    request = text_encoder_pb2.EncodePromptRequest(**fields)
    return assemble(c for response in _stub(server).EncodePrompt(request, timeout=30) for c in response.chunks)


def _expected(pipeline, prefix, prompt, prompt_2=None, negative_prompt=None, negative_prompt_2=None, n=1, guided=True,
              prompt_syntax="plain"):
    embeddings = pipeline.encode_prompt(prompt, prompt_2, negative_prompt, negative_prompt_2, n, guided, prompt_syntax)
    return {f"{prefix}/{name}": t for name, t in vars(embeddings).items() if t is not None}


def _assert_bit_equal(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("negative", [[], ["blurry", "dark"]], ids=["force_zeros", "negatives"])
def test_base_and_refiner_embeddings_are_bit_equal_to_the_pipelines(servers, pipelines, negative):
    base, refiner = pipelines
    prompt, prompt_2 = ["a cat", "a dog on a hill"], ["oil painting"]
    got = _encode(servers[0], prompt=prompt, prompt_2=prompt_2, negative_prompt=negative, targets=[BASE, REFINER],
                  num_images_per_prompt=2, guided=True)
    negative = negative or None
    want = _expected(base, "base", prompt, "oil painting", negative, None, 2) | _expected(
        refiner, "refiner", prompt, "oil painting", negative, None, 2)
    _assert_bit_equal(got, want)
    assert got["base/prompt_embeds"].shape[:2] == (4, 77)
    if negative is None:  # the base forces zeros, the refiner encodes ""
        assert not got["base/negative_prompt_embeds"].any()
        assert got["refiner/negative_prompt_embeds"].any()


def test_the_embeddings_of_both_targets_travel_packed_in_as_few_messages_as_the_chunk_size_allows(servers):
    request = text_encoder_pb2.EncodePromptRequest(prompt=["a cat"], targets=[BASE, REFINER], guided=True)
    responses = list(_stub(servers[0]).EncodePrompt(request, timeout=30))
    sizes = [sum(len(c.data) for c in r.chunks) for r in responses]
    assert sum(len(r.chunks) for r in responses) == 8  # 4 tensors per target
    assert len(responses) == math.ceil(sum(sizes) / CHUNK_BYTES) and max(sizes) <= CHUNK_BYTES


def test_negative_prompt_2_and_unguided_requests_match(servers, pipelines):
    base, _ = pipelines
    got = _encode(servers[1], prompt=["a cat"], negative_prompt=["ugly"], negative_prompt_2=["grainy"],
                  targets=[BASE], guided=True)
    _assert_bit_equal(got, _expected(base, "base", ["a cat"], None, "ugly", "grainy"))
    got = _encode(servers[1], prompt=["a cat"], targets=[BASE], guided=False)
    _assert_bit_equal(got, _expected(base, "base", ["a cat"], guided=False))


@pytest.mark.parametrize("fields, code", [
    (dict(prompt=[], targets=[BASE]), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"], targets=[BASE]), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt=["a", "b"], prompt_2=["x", "y", "z"], targets=[BASE]), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt=["a"] * 65, targets=[BASE]), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt=["a"] * 8, num_images_per_prompt=9, targets=[BASE]), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt=["a"], targets=[]), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt=["a"], targets=[BASE, BASE]), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(prompt=["a"], targets=[REFINER]), grpc.StatusCode.FAILED_PRECONDITION),
], ids=["no_prompt", "negatives", "prompt_2", "too_many", "too_many_images", "no_target", "twice", "no_refiner"])
def test_bad_requests_are_refused_and_the_server_keeps_serving(servers, fields, code):
    with pytest.raises(grpc.RpcError) as error:
        _encode(servers[1], **fields)
    assert error.value.code() == code, error.value.details()
    assert _encode(servers[1], prompt=["ok"], targets=[BASE])["base/prompt_embeds"].shape[0] == 1


def test_stage_process_prints_its_address_and_stops_on_sigterm(tiny_model_dir):
    command = [sys.executable, "-m", "sdxl_services", "text_encoder", "--model", str(tiny_model_dir / "base"),
               "--address", "127.0.0.1:0", "--grace", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) as process:
        try:
            line = process.stdout.readline()
            assert line.startswith("text_encoder listening on 127.0.0.1:"), line
            port = int(line.rsplit(":", 1)[1])  # listening first: SERVING once the weights are loaded
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            for response in health.Watch(health_pb2.HealthCheckRequest(), timeout=120):
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            got = _encode(type("S", (), {"port": port}), prompt=["a cat"], targets=[BASE])
            assert got["base/prompt_embeds"].shape[0] == 1
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()


# --- prompt_syntax="compel" -----------------------------------------------------------------

LONG = "a photo of a (red)1.3 fox++ sitting in deep snow--, with (tall)0.8 mountains behind it. " * 9  # 3 chunks


def test_compel_prompts_of_any_length_are_bit_equal_to_the_pipelines(servers, pipelines):
    base, refiner = pipelines
    prompt, prompt_2, negative = [LONG, "a (cat)1.2"], ["an oil painting, " * 60], ["blurry--"]
    got = _encode(servers[0], prompt=prompt, prompt_2=prompt_2, negative_prompt=negative, targets=[BASE, REFINER],
                  num_images_per_prompt=2, guided=True, prompt_syntax="compel")
    want = _expected(base, "base", prompt, prompt_2[0], negative[0], None, 2, prompt_syntax="compel") | _expected(
        refiner, "refiner", prompt, prompt_2[0], negative[0], None, 2, prompt_syntax="compel")
    _assert_bit_equal(got, want)
    # The base's bigG reads prompt_2 (3 chunks of 77 padded to 4), the refiner's prompt: lengths differ by target.
    assert got["base/prompt_embeds"].shape[:2] == got["base/negative_prompt_embeds"].shape[:2] == (4, 4 * 77)
    assert got["refiner/prompt_embeds"].shape[:2] == (4, 3 * 77)
    plain = _encode(servers[0], prompt=prompt, targets=[BASE], guided=False)
    assert plain["base/prompt_embeds"].shape[:2] == (2, 77)  # "" is "plain"


@pytest.mark.parametrize("fields, named", [
    (dict(prompt=["a"], prompt_syntax="a1111"), "prompt_syntax"),
    (dict(prompt=["a cat.swap(dog)"], prompt_syntax="compel"), "prompt"),
    (dict(prompt=["a"], negative_prompt=['("x", "y").blend(1, 2, 3)'], prompt_syntax="compel"), "negative_prompt"),
    (dict(prompt=["word " * 1300], prompt_syntax="compel"), "prompt"),  # 18 chunks
    # 40 fragments below 1 over 2 chunks: 82 passes, for each of 8 prompts
    (dict(prompt=["a"] * 8, negative_prompt=["(dark)0.5 night " * 40], prompt_syntax="compel"), "passes"),
], ids=["syntax", "swap", "blend_weights", "too_long", "too_many_passes"])
def test_bad_compel_requests_are_invalid_argument_naming_the_field(servers, fields, named):
    with pytest.raises(grpc.RpcError) as error:
        _encode(servers[1], targets=[BASE], guided=True, **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"`{named}`" in error.value.details() or named in error.value.details()


@pytest.fixture
def engine_stub(tiny_model_dir):
    """A text encoder of this test's own, for concurrent calls (never the session's stages)."""
    servicer = text_encoder.load_servicer(tiny_model_dir / "base")
    server = text_encoder.make_server(servicer, "127.0.0.1:0")
    yield servicer, text_encoder_pb2_grpc.TextEncoderStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    server.stop(0)


def test_a_compel_call_is_encoded_alone_and_plain_calls_of_its_key_still_share(engine_stub, monkeypatch):
    servicer, stub = engine_stub
    R = text_encoder_pb2.EncodePromptRequest
    first = R(prompt=["first"], targets=[BASE])  # unguided: another key, held at the gate
    requests = [R(prompt=["a cat"], negative_prompt=["ugly"], targets=[BASE], guided=True),
                R(prompt=[LONG], negative_prompt=["ugly"], targets=[BASE], guided=True, prompt_syntax="compel"),
                R(prompt=["a (dog)0.5"], negative_prompt=["ugly"], targets=[BASE], guided=True, prompt_syntax="compel"),
                R(prompt=["a bird"], negative_prompt=["ugly"], targets=[BASE], guided=True)]
    solo = [engine.encode(stub, r) for r in requests]
    encodes = []
    encode = text_encoder.Encoders.encode
    monkeypatch.setattr(text_encoder.Encoders, "encode",
                        lambda self, calls, loras=None: encodes.append([c.prompt[0] for c in calls])
                        or encode(self, calls, loras))
    gate = engine.Gate(engine.bigg(servicer), monkeypatch)
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        head, futures, _ = engine.overlapped(stub, servicer.engine, gate, monkeypatch, first, requests, pool)
        head.result(engine.WAIT_S)
        for future, want in zip(futures, solo):
            engine.assert_close(future.result(engine.WAIT_S), want)
    assert encodes == [["first"], ["a cat", "a bird"], [LONG], ["a (dog)0.5"]]
