import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from sdxl_client.cli import main
from sdxl_client.output import output_paths


def test_generate_writes_the_pngs_and_exits_0(fake_orchestrator, tmp_path, capsys):
    address, servicer = fake_orchestrator
    out = tmp_path / "out.png"
    code = main(["generate", "a horse", "--address", address, "--size", "40x24", "--steps", "2", "--seed", "5",
                 "--refiner", "ensemble", "--high-noise-frac", "0.7", "--num-images", "2", "--no-watermark",
                 "-o", str(out)])
    assert code == 0
    assert Image.open(out).size == (40, 24) and Image.open(tmp_path / "out-1.png").size == (40, 24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png", "out.png"]  # no temporary files left
    params = servicer.requests[0][0].params
    assert (params.width, params.height, params.seed, params.watermark) == (40, 24, 5, False)
    assert abs(params.high_noise_frac - 0.7) < 1e-6
    captured = capsys.readouterr()
    assert "base" in captured.err and "2/2" in captured.err and str(out) in captured.out


def test_generate_reports_a_server_error_and_exits_1(fake_orchestrator, tmp_path, capsys):
    import grpc

    address, servicer = fake_orchestrator
    servicer.abort_with = (grpc.StatusCode.INVALID_ARGUMENT, "height must be a multiple of 8")
    assert main(["generate", "p", "--address", address, "-o", str(tmp_path / "x.png")]) == 1
    assert "INVALID_ARGUMENT: height must be a multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_reencodes_for_a_jpeg_name(fake_orchestrator, tmp_path):
    address, _ = fake_orchestrator
    assert main(["generate", "p", "--address", address, "--steps", "1", "-o", str(tmp_path / "o.jpg")]) == 0
    assert Image.open(tmp_path / "o.jpg").format == "JPEG"


def test_health_exits_0_when_serving_and_1_otherwise(health_server, capsys):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main(["health", address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["health", address]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"


def test_health_exits_1_when_nothing_listens(capsys):
    from sdxl_services.launch import free_port

    assert main(["health", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


def test_serve_stage_becomes_that_stage_process():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sdxl_client", "serve", "vae", "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and "python -m sdxl_services" in done.stdout


def test_generate_refuses_a_mask_without_an_image_with_exit_2(fake_orchestrator, tmp_path, capsys):
    address, servicer = fake_orchestrator
    Image.new("L", (8, 8)).save(tmp_path / "m.png")
    assert main(["generate", "p", "--address", address, "--mask", str(tmp_path / "m.png")]) == 2
    assert "mask_image needs image" in capsys.readouterr().err and servicer.requests == []


def test_output_paths_number_the_extra_images():
    assert [p.name for p in output_paths("dir/out.png", 3)] == ["out.png", "out-1.png", "out-2.png"]


def test_generate_sends_the_token_file_stripped(fake_orchestrator, tmp_path):
    address, servicer = fake_orchestrator
    (tmp_path / "token").write_text("s3cret\n")
    assert main(["generate", "p", "--address", address, "--steps", "1", "--token-file", str(tmp_path / "token"),
                 "-o", str(tmp_path / "o.png")]) == 0
    assert servicer.metadata[0]["authorization"] == "Bearer s3cret"


def test_generate_refuses_an_empty_token_file_with_exit_2(fake_orchestrator, tmp_path, capsys):
    address, servicer = fake_orchestrator
    (tmp_path / "token").write_text(" \n")
    assert main(["generate", "p", "--address", address, "--token-file", str(tmp_path / "token")]) == 2
    assert "is empty" in capsys.readouterr().err and servicer.requests == []


def test_generate_sends_the_prompt_syntax(fake_orchestrator, tmp_path, capsys):
    address, servicer = fake_orchestrator
    prompt = "a (red)1.3 horse++ " * 30
    assert main(["generate", prompt, "--prompt-syntax", "compel", "--address", address, "--steps", "1",
                 "-o", str(tmp_path / "o.png")]) == 0
    assert main(["generate", "p", "--address", address, "--steps", "1", "-o", str(tmp_path / "p.png")]) == 0
    sent = [requests[0].params for requests in servicer.requests]
    assert (sent[0].prompt_syntax, list(sent[0].prompt)) == ("compel", [prompt])
    assert sent[1].prompt_syntax == ""  # the server's default: plain


def test_generate_sends_lora_adapters_with_their_weights(fake_orchestrator, tmp_path, capsys):
    address, servicer = fake_orchestrator
    assert main(["generate", "p", "--lora", "pixel:0.8", "--lora", "papercut", "--refiner", "ensemble",
                 "--refiner-lora", "refined:1.5", "--address", address, "--steps", "1",
                 "-o", str(tmp_path / "o.png")]) == 0
    sent = servicer.requests[0][0].params
    assert [(a.name, a.weight if a.HasField("weight") else None) for a in sent.loras] == [
        ("pixel", pytest.approx(0.8)), ("papercut", None)]  # a float32 on the wire; unset: 1 at the stages
    assert [(a.name, a.weight) for a in sent.refiner_loras] == [("refined", 1.5)]
    with pytest.raises(SystemExit):
        main(["generate", "p", "--lora", "pixel:strong", "--address", address])
    assert "not a number" in capsys.readouterr().err
