"""The text-encoder stage: embeddings bit-equal to the pipelines', bad requests refused with the right code."""

import math
import os
import signal
import subprocess
import sys

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdxl.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from sdxl_core.pipelines import SDXLImg2ImgPipeline, SDXLPipeline
from sdxl_services import text_encoder
from sdxl_wire import CHUNK_BYTES
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


def _expected(pipeline, prefix, prompt, prompt_2=None, negative_prompt=None, negative_prompt_2=None, n=1, guided=True):
    embeddings = pipeline.encode_prompt(prompt, prompt_2, negative_prompt, negative_prompt_2, n, guided)
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
