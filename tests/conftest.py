from pathlib import Path

import pytest
import torch

from tests.oracle import REFERENCE_DIR


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models beside server processes on shared CPUs run far faster on one thread than oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    assert REFERENCE_DIR.is_dir(), f"the official SDXL configs are expected at {REFERENCE_DIR}"
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with the tiny base/, refiner/, inpainting/ and sd_xl_{base,refiner}_tiny.safetensors."""
    from sdxl_core.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def stages(tiny_model_dir):
    """The four stage servers on the tiny model, in this process on loopback: {stage: "127.0.0.1:port"}."""
    from sdxl_services import denoiser, text_encoder, vae

    servers = {
        "text_encoder": text_encoder.build(tiny_model_dir / "base", tiny_model_dir / "refiner"),
        "base": denoiser.build(tiny_model_dir / "base"),
        "refiner": denoiser.build(tiny_model_dir / "refiner"),
        "vae": vae.build(tiny_model_dir / "base"),
    }
    yield {name: f"127.0.0.1:{server.port}" for name, server in servers.items()}
    for server in servers.values():
        server.stop(0)


@pytest.fixture(scope="session")
def orchestrator_address(stages) -> str:
    """An orchestrator over `stages`."""
    from sdxl_services import orchestrator

    server = orchestrator.build(stages["text_encoder"], stages["base"], stages["refiner"], stages["vae"])
    yield f"127.0.0.1:{server.port}"
    server.stop(0)
