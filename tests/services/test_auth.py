"""--auth-token-file: calls without the bearer token are refused UNAUTHENTICATED; health and reflection stay open;
the orchestrator sends its token to the stages; default binds are loopback."""

import threading
import time
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from sdxl.v1 import stage_pb2, stage_pb2_grpc
from sdxl_client import SDXLClient
from sdxl_client.cli import main as sdxl
from sdxl_services import denoiser, launch, metrics, text_encoder, vae
from sdxl_services.server import Server, ServerOptions
from sdxl_services.stage import open_stage, parse_args, server_options

TOKEN = "s3cret-token"
SERVICE = "test.Echo"
WAIT_S = 30.0


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")  # surrounding whitespace is not part of the token
    return str(path)


def _echo() -> grpc.GenericRpcHandler:
    def chat(requests, context):
        yield from requests

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })


@pytest.fixture
def channel(token_file):
    """A channel to a SERVING test server that requires the token."""
    server = Server("authtest", [_echo()], [SERVICE], "127.0.0.1:0", ServerOptions(auth_token_file=token_file))
    server.start()
    server.set_serving()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield channel
    channel.close()
    server.stop(0)


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_calls_without_the_right_token_are_unauthenticated(channel):
    echo = channel.unary_unary(f"/{SERVICE}/Echo")
    assert _code(lambda: echo(b"x", timeout=WAIT_S)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: echo(b"x", timeout=WAIT_S, metadata=_bearer("wrong"))) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: echo(b"x", timeout=WAIT_S, metadata=[("authorization", TOKEN)])) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert echo(b"x", timeout=WAIT_S, metadata=_bearer(TOKEN)) == b"x"


def test_a_streaming_call_is_refused_before_it_sends_anything(channel):
    release = threading.Event()  # as the orchestrator's Denoise reservation: nothing is sent until admitted

    def held():
        release.wait(WAIT_S)
        yield b"late"

    began = time.monotonic()
    call = channel.stream_stream(f"/{SERVICE}/Chat")(held(), timeout=WAIT_S)
    assert _code(lambda: list(call)) == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - began < WAIT_S / 2
    release.set()
    assert list(channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"a"]), metadata=_bearer(TOKEN))) == [b"a"]


def test_health_and_reflection_stay_open_and_describe_needs_the_token(channel):
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    listed = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  timeout=WAIT_S))
    assert SERVICE in {s.name for s in listed.list_services_response.service}
    describe = stage_pb2_grpc.StageInfoStub(channel).Describe
    assert _code(lambda: describe(stage_pb2.DescribeRequest(), timeout=WAIT_S)) == grpc.StatusCode.UNAUTHENTICATED
    assert describe(stage_pb2.DescribeRequest(), timeout=WAIT_S, metadata=_bearer(TOKEN)).stage == "authtest"


def test_an_empty_token_file_is_an_error_at_start(tmp_path):
    (tmp_path / "token").write_text(" \n")
    with pytest.raises(ValueError, match="is empty"):
        Server("authtest", [_echo()], [SERVICE], "127.0.0.1:0", ServerOptions(auth_token_file=str(tmp_path / "token")))


def test_the_flag_reaches_the_server_options(token_file):
    assert server_options(parse_args(["base", "--auth-token-file", token_file])).auth_token_file == token_file
    assert server_options(parse_args(["base"])).auth_token_file is None


@pytest.fixture(scope="module")
def guarded_stages(tiny_model_dir, tmp_path_factory):
    """Text encoder, base and VAE on the tiny model, each requiring TOKEN: ({stage: address}, token file)."""
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text(TOKEN)

    def options(module):
        return replace(module.OPTIONS, auth_token_file=str(path))

    servers = {
        "text_encoder": text_encoder.build(tiny_model_dir / "base", address="127.0.0.1:0",
                                           options=options(text_encoder)),
        "base": denoiser.build(tiny_model_dir / "base", address="127.0.0.1:0", options=options(denoiser)),
        "vae": vae.build(tiny_model_dir / "base", address="127.0.0.1:0", options=options(vae)),
    }
    yield {name: f"127.0.0.1:{server.port}" for name, server in servers.items()}, str(path)
    for server in servers.values():
        server.stop(0)


def _orchestrator(stages: dict[str, str], *flags: str) -> Server:
    argv = ["orchestrator", "--text-encoder", stages["text_encoder"], "--base", stages["base"], "--vae", stages["vae"],
            "--address", "127.0.0.1:0", *flags]
    server, _ = open_stage(parse_args(argv))
    return server


@pytest.mark.usefixtures("one_thread")
def test_the_orchestrator_sends_its_token_to_stages_that_require_it(guarded_stages, tmp_path):
    stages, path = guarded_stages
    server = _orchestrator(stages, "--auth-token-file", path)
    address = f"127.0.0.1:{server.port}"
    try:
        with SDXLClient(address, timeout=WAIT_S, token=TOKEN) as client:
            result = client.generate("a red cube", height=64, width=64, num_inference_steps=2, seed=1)
            # img2img asks the base's StageInfo.Describe first: the token rides on that call too.
            again = client.generate("a red cube", image=result.images[0], strength=0.5, num_inference_steps=2, seed=1)
            assert client.health() == "SERVING"
        assert len(result.images) == 1 and again.images[0].size == (64, 64)
        with SDXLClient(address, timeout=WAIT_S) as client:
            assert _code(lambda: client.generate("p", num_inference_steps=1)) == grpc.StatusCode.UNAUTHENTICATED
        out = tmp_path / "out.png"
        assert sdxl(["generate", "a cube", "--address", address, "--size", "64x64", "--steps", "1",
                     "--token-file", path, "-o", str(out)]) == 0
        assert Image.open(out).size == (64, 64)
        assert sdxl(["generate", "a cube", "--address", address, "--steps", "1", "-o", str(out)]) == 1
        assert sdxl(["health", address]) == 0  # health needs no token
    finally:
        server.stop(0)


def test_an_orchestrator_with_the_wrong_stage_token_reports_the_refusing_stage(guarded_stages, tmp_path):
    stages, path = guarded_stages
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    server = _orchestrator(stages, "--auth-token-file", path, "--stage-auth-token-file", str(wrong))
    try:
        with SDXLClient(f"127.0.0.1:{server.port}", timeout=WAIT_S, token=TOKEN) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.generate("p", height=64, width=64, num_inference_steps=1)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "base stage" in info.value.details()
    finally:
        server.stop(0)


def test_stages_and_serve_all_listen_on_loopback_by_default():
    assert parse_args(["base"]).address == "127.0.0.1:50051"
    assert parse_args(["orchestrator"]).address.startswith("127.0.0.1:")
    assert launch.parser().parse_args(["--all"]).host == "127.0.0.1"
    assert launch.ServeOptions().host == "127.0.0.1"


def test_serve_all_passes_the_token_file_to_every_process():
    options = launch.ServeOptions(auth_token_file="/run/token")
    for process in options.processes(gpus=0, cores=2):
        assert options.stage_args(process)[-2:] == ["--auth-token-file", "/run/token"]
    assert options.orchestrator_args([], {})[-2:] == ["--auth-token-file", "/run/token"]


@pytest.mark.parametrize(("address", "host"), [("127.0.0.1:0", "127.0.0.1"), ("[::]:0", "::"),
                                               ("0.0.0.0:0", "0.0.0.0")])
def test_the_metrics_port_listens_on_the_address_host(monkeypatch, address, host):
    bound = []
    monkeypatch.setattr(metrics.prometheus_client, "start_http_server", lambda port, addr: bound.append((port, addr)))
    server = Server("authtest", [_echo()], [SERVICE], address, ServerOptions(metrics_port=9999))
    server.start()
    server.stop(0)
    assert bound == [(9999, host)]
