import asyncio
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from sdxl.v1 import orchestrator_pb2
from sdxl_client import AsyncSDXLClient, SDXLClient


def test_generate_returns_the_images_and_seed(fake_orchestrator):
    address, servicer = fake_orchestrator
    with SDXLClient(address) as client:
        result = client.generate(["a", "b"], num_images_per_prompt=2, width=48, height=32, seed=7)
    assert result.seed == 7 and len(result.images) == 4 and len(result.png) == 4
    assert all(image.size == (48, 32) for image in result.images)
    assert result.images[1].getpixel((0, 0)) == (40, 100, 200)
    params = servicer.requests[0][0].params
    assert list(params.prompt) == ["a", "b"] and params.seed == 7


def test_prompt_syntax_is_sent_by_both_clients(fake_orchestrator):
    address, servicer = fake_orchestrator
    with SDXLClient(address) as client:
        client.generate("a (cat)1.3", prompt_syntax="compel")

    async def main():
        async with AsyncSDXLClient(address) as client:
            await client.generate("a (dog)0.5", prompt_syntax="compel")

    asyncio.run(main())
    assert [requests[0].params.prompt_syntax for requests in servicer.requests] == ["compel", "compel"]


def test_progress_callback_sees_every_stage_in_order(fake_orchestrator):
    address, _ = fake_orchestrator
    events = []
    with SDXLClient(address) as client:
        client.generate("p", num_inference_steps=3, on_progress=lambda *e: events.append(e))
    assert events == [("encode_prompt", 1, 1), ("base", 1, 3), ("base", 2, 3), ("base", 3, 3), ("decode", 1, 1)]


def test_request_id_is_sent_as_metadata(fake_orchestrator):
    address, servicer = fake_orchestrator
    with SDXLClient(address, metadata=[("x-tenant", "t1")]) as client:
        given = client.generate("p", num_inference_steps=1, request_id="req-42")
        generated = client.generate("p", num_inference_steps=1)
    assert given.request_id == "req-42" and servicer.metadata[0]["x-request-id"] == "req-42"
    assert servicer.metadata[0]["x-tenant"] == "t1"
    assert servicer.metadata[1]["x-request-id"] == generated.request_id
    uuid.UUID(generated.request_id)


def test_server_errors_reach_the_caller_with_code_and_details(fake_orchestrator):
    address, servicer = fake_orchestrator
    servicer.abort_with = (grpc.StatusCode.INVALID_ARGUMENT, "num_inference_steps must be >= 1; got -3")
    with SDXLClient(address) as client, pytest.raises(grpc.RpcError) as raised:
        client.generate("p", num_inference_steps=-3)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_inference_steps" in raised.value.details()


def test_img2img_and_inpaint_send_the_images_after_the_params(fake_orchestrator, tmp_path):
    address, servicer = fake_orchestrator
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "init.png")
    mask = Image.new("L", (16, 16), 255)
    with SDXLClient(address) as client:
        client.generate("p", num_inference_steps=1, image=tmp_path / "init.png")
        client.generate("p", num_inference_steps=1, image=tmp_path / "init.png", mask_image=mask)
    img2img, inpaint = servicer.requests
    assert img2img[0].params.mode == orchestrator_pb2.MODE_IMG2IMG
    assert {r.WhichOneof("payload") for r in img2img[1:]} == {"image"}
    assert inpaint[0].params.mode == orchestrator_pb2.MODE_INPAINT
    assert [r.WhichOneof("payload") for r in inpaint[1:]][-1] == "mask_image"


def test_a_failing_callback_cancels_the_call_and_propagates(fake_orchestrator):
    address, _ = fake_orchestrator

    def boom(*_):
        raise KeyError("stop")

    with SDXLClient(address) as client, pytest.raises(KeyError):
        client.generate("p", num_inference_steps=2, on_progress=boom)


def test_async_generate_with_a_coroutine_callback(fake_orchestrator):
    address, servicer = fake_orchestrator
    events = []

    async def on_progress(stage, step, total):
        events.append((stage, step, total))

    async def main():
        async with AsyncSDXLClient(address) as client:
            return await client.generate("p", num_inference_steps=2, width=24, height=16, seed=3,
                                         on_progress=on_progress, request_id="async-1")

    result = asyncio.run(main())
    assert result.seed == 3 and result.images[0].size == (24, 16)
    assert events[-1] == ("decode", 1, 1) and ("base", 2, 2) in events
    assert servicer.metadata[0]["x-request-id"] == "async-1"


def test_async_errors_reach_the_caller(fake_orchestrator):
    address, servicer = fake_orchestrator
    servicer.abort_with = (grpc.StatusCode.INVALID_ARGUMENT, "bad size")

    async def main():
        async with AsyncSDXLClient(address) as client:
            await client.generate("p")

    with pytest.raises(grpc.RpcError) as raised:
        asyncio.run(main())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and raised.value.details() == "bad size"


def test_health_reports_the_status_name(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    with SDXLClient(address) as client:
        assert client.health() == "SERVING"
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert client.health() == "NOT_SERVING"


def test_a_stream_without_a_result_is_a_protocol_error(fake_orchestrator):
    from sdxl_client import ProtocolError

    address, servicer = fake_orchestrator
    servicer.send_result = False
    with SDXLClient(address) as client, pytest.raises(ProtocolError, match="without a GenerateResult"):
        client.generate("p", num_inference_steps=1)


def test_token_is_sent_as_a_bearer_authorization(fake_orchestrator):
    address, servicer = fake_orchestrator
    with SDXLClient(address, token="s3cret") as client:
        client.generate("p", num_inference_steps=1)

    async def main():
        async with AsyncSDXLClient(address, token="s3cret") as client:
            await client.generate("p", num_inference_steps=1)

    asyncio.run(main())
    assert [m["authorization"] for m in servicer.metadata] == ["Bearer s3cret"] * 2
