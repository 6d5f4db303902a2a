"""`python -m sdxl_services STAGE`: its flags and what it refuses before listening."""

import subprocess
import sys

import pytest

from sdxl_services.stage import parse_args, server_options, stage_tls
from sdxl_services.tls import ChannelTls, ServerTls


def test_an_absent_model_path_fails_before_listening_naming_the_flag(tmp_path):
    missing = tmp_path / "models" / "sdxl-base-1.0"
    run = subprocess.run([sys.executable, "-m", "sdxl_services", "base", "--model", str(missing),
                          "--address", "127.0.0.1:0"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"--model {missing} does not exist" in run.stderr
    assert "listening" not in run.stdout


def test_an_absent_refiner_model_of_the_text_encoder_is_named_too(tmp_path, tiny_model_dir):
    from sdxl_services.stage import check_models

    args = parse_args(["text_encoder", "--model", str(tiny_model_dir / "base"),
                       "--refiner-model", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="--refiner-model"):
        check_models(args)
    check_models(parse_args(["base", "--model", "stabilityai/stable-diffusion-xl-base-1.0"]))  # a hub id passes


def test_tls_flags_become_server_and_stage_channel_settings():
    args = parse_args(["base", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem",
                       "--health-port", "50052"])
    options = server_options(args)
    assert options.tls == ServerTls("c.pem", "k.pem", "ca.pem") and options.health_port == 50052
    plain = parse_args(["base"])
    assert server_options(plain).tls is None and stage_tls(plain) is None
    args = parse_args(["orchestrator", "--text-encoder", "a:1", "--base", "b:1", "--vae", "v:1",
                       "--stage-tls-ca", "ca.pem", "--stage-tls-cert", "o.pem", "--stage-tls-key", "o.key",
                       "--stage-tls-server-name", "sdxl-stages"])
    assert stage_tls(args) == ChannelTls("ca.pem", "o.pem", "o.key", "sdxl-stages")


@pytest.mark.parametrize("argv", [
    ["base", "--tls-cert", "c.pem"],
    ["base", "--tls-key", "k.pem"],
    ["base", "--tls-client-ca", "ca.pem"],
    ["orchestrator", "--stage-tls-cert", "o.pem", "--stage-tls-key", "o.key"],
    ["orchestrator", "--stage-tls-ca", "ca.pem", "--stage-tls-cert", "o.pem"],
    ["orchestrator", "--stage-tls-server-name", "x"],
])
def test_incomplete_tls_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "error:" in capsys.readouterr().err


def test_a_stage_listens_not_serving_while_it_loads_then_describes_what_it_loaded(monkeypatch, tiny_model_dir):
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sdxl.v1 import denoiser_pb2, denoiser_pb2_grpc, stage_pb2, stage_pb2_grpc, tensor_pb2
    from sdxl_services import stage

    release, real_load = threading.Event(), stage.load
    monkeypatch.setattr(stage, "load", lambda args: release.wait(60) and real_load(args))
    model = str(tiny_model_dir / "inpainting")
    server, load_weights = stage.open_stage(parse_args(["base", "--model", model, "--address", "127.0.0.1:0"]))
    loader = threading.Thread(target=load_weights)
    loader.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        health = health_pb2_grpc.HealthStub(channel)
        describe = stage_pb2_grpc.StageInfoStub(channel).Describe
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
        for call in (lambda: describe(stage_pb2.DescribeRequest(), timeout=10),
                     lambda: list(denoiser_pb2_grpc.DenoiserStub(channel).Denoise(
                         iter([denoiser_pb2.DenoiseRequest(header=denoiser_pb2.DenoiseHeader())]), timeout=10))):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.value.details()
        release.set()
        loader.join(120)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        info = describe(stage_pb2.DescribeRequest(), timeout=10)
        assert (info.stage, info.model_kind, info.model, info.device) == ("base", "inpainting", model, "cpu")
        assert (info.unet.in_channels, info.dtype) == (9, tensor_pb2.DTYPE_FLOAT32)
        assert info.scheduler_config["num_train_timesteps"] == 1000 and info.limits.max_steps > 0
    finally:
        release.set()
        server.stop(0)
