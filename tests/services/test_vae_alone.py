"""The vae stage with a VAE alone: `--vae-model` (or `--model` itself) names a VAE folder, and Decode serves its
pixels; a --vae-model that does not exist stops the stage before it listens."""

import shutil

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl.v1 import vae_pb2, vae_pb2_grpc
from sdxl_core.pipelines import SDXLPipeline
from sdxl_services import vae
from sdxl_services.stage import open_stage, parse_args
from sdxl_wire.tensors import to_proto_chunks
from tests.wire.streams import assemble

LATENTS = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory) -> dict:
    """The tiny base's VAE as a folder of its own; another with other weights; one with only the fp16 variant."""
    root = tmp_path_factory.mktemp("vae-alone")
    same = shutil.copytree(tiny_model_dir / "base/vae", root / "same")
    other = shutil.copytree(same, root / "other")
    state = load_file(same / WEIGHTS)
    save_file(state | {"decoder.conv_out.bias": state["decoder.conv_out.bias"] + 0.5}, other / WEIGHTS)
    fp16 = shutil.copytree(same, root / "fp16")
    (fp16 / WEIGHTS).unlink()
    save_file({name: t.half() for name, t in state.items()}, fp16 / "diffusion_pytorch_model.fp16.safetensors")
    return {"same": same, "other": other, "fp16": fp16}


@pytest.fixture(scope="module")
def full(tiny_model_dir):
    server = vae.build(tiny_model_dir / "base")
    yield server
    server.stop(0)


def stage(*flags: str):
    server, load_weights = open_stage(parse_args(["vae", *flags, "--address", "127.0.0.1:0"]))
    load_weights()
    return server


def decoded(server, latents=LATENTS) -> np.ndarray:
    """Decode's RAW pixels without the watermark, (B, H, W, 3) uint8."""
    header = vae_pb2.DecodeHeader(output_format=vae_pb2.OUTPUT_FORMAT_RAW, watermark=False)
    messages = [vae_pb2.DecodeRequest(header=header)]
    messages += [vae_pb2.DecodeRequest(chunks=[c]) for c in to_proto_chunks("latents", latents)]
    stub = vae_pb2_grpc.VaeStub(grpc.insecure_channel(f"localhost:{server.port}"))
    return assemble(r.chunk for r in stub.Decode(iter(messages), timeout=60))["images"].numpy()


@pytest.mark.parametrize("flags", [("--vae-model", "same"), ("--model", "same")], ids=["vae-model", "model"])
def test_a_vae_folder_serves_the_decode_of_the_full_model(tiny_model_dir, folders, full, flags):
    flag, name = flags
    extra = ["--model", str(tiny_model_dir / "base")] if flag == "--vae-model" else []
    server = stage(*extra, flag, str(folders[name]))
    try:
        assert np.array_equal(decoded(server), decoded(full))
    finally:
        server.stop(0)


@pytest.mark.parametrize("name", ["other", "fp16"])
def test_vae_model_replaces_the_models_vae_as_from_pretrained_does(tiny_model_dir, folders, full, name):
    server = stage("--model", str(tiny_model_dir / "base"), "--vae-model", str(folders[name]))
    try:
        served = decoded(server)
    finally:
        server.stop(0)
    pipe = SDXLPipeline.from_pretrained(tiny_model_dir / "base", vae=folders[name], add_watermarker=False)
    assert np.array_equal(served[0], np.asarray(pipe.decode(LATENTS, "pil")[0]))
    if name == "other":
        assert not np.array_equal(served, decoded(full))


def test_an_absent_vae_model_fails_before_listening_naming_the_flag(tiny_model_dir, tmp_path):
    missing = tmp_path / "models" / "sdxl-vae-fp16-fix"
    with pytest.raises(SystemExit, match=f"--vae-model {missing} does not exist"):
        stage("--model", str(tiny_model_dir / "base"), "--vae-model", str(missing))
