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


@pytest.fixture(scope="session")
def lora_files(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Random LoRA files for the tiny base, in one folder (a stage's --lora-dir), by adapter name:
    style: kohya, sgm layout, UNet attention, feed-forward and resnet convolutions plus both text encoders
    (rank 4, alpha 2); style_diffusers_names: the same under kohya's diffusers-layout UNet names (another folder);
    detail: diffusers format, UNet attention (rank 8, alpha 4 in the metadata); text: diffusers format, the text
    encoders alone (rank 4, no alpha: scale 1)."""
    from sdxl_core import SDXLPipeline
    from sdxl_core.lora.write import ATTENTION, TEXT_ATTENTION, random_layers, write_lora

    pipe = SDXLPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)
    folder, other = tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("loras_other")
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    texts = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    unet_targets = ATTENTION + ("ff.net.0.proj", "ff.net.2", "conv1", "conv2", "proj_in")
    style = random_layers(models, 4, seed=1, alpha=2.0, targets=unet_targets + TEXT_ATTENTION)
    return {
        "style": write_lora(folder / "style.safetensors", style, "kohya", unet=pipe.unet),
        "style_diffusers_names": write_lora(other / "style_diffusers_names.safetensors", style, "kohya"),
        "detail": write_lora(folder / "detail.safetensors", random_layers({"unet": pipe.unet}, 8, seed=2, alpha=4.0),
                             "diffusers"),
        "text": write_lora(folder / "text.safetensors", random_layers(texts, 4, seed=3, std=0.2), "diffusers"),
    }


@pytest.fixture(scope="session")
def lora_orchestrator(tiny_model_dir, lora_files, tmp_path_factory):
    """Text encoder, base, refiner and VAE stages serving one --lora-dir, and an orchestrator over them: its
    address and the folder. The folder holds lora_files' adapters, `refined` (the refiner's UNet and bigG), and
    the README's names: papercut (style's file), pixel-art (detail's)."""
    import shutil

    from sdxl_core import SDXLImg2ImgPipeline
    from sdxl_core.lora.write import random_layers, write_lora
    from sdxl_services import denoiser, orchestrator, text_encoder, vae

    folder = tmp_path_factory.mktemp("served") / "loras"
    shutil.copytree(lora_files["style"].parent, folder)
    shutil.copy(lora_files["style"], folder / "papercut.safetensors")
    shutil.copy(lora_files["detail"], folder / "pixel-art.safetensors")
    refiner = SDXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "refiner", add_watermarker=False)
    write_lora(folder / "refined.safetensors", random_layers(
        {"unet": refiner.unet, "text_encoder_2": refiner.text_encoder_2}, 4, seed=5, std=0.1), "kohya",
        unet=refiner.unet)
    stages = {
        "text_encoder": text_encoder.build(tiny_model_dir / "base", tiny_model_dir / "refiner", lora_dir=folder),
        "base": denoiser.build(tiny_model_dir / "base", lora_dir=folder),
        "refiner": denoiser.build(tiny_model_dir / "refiner", lora_dir=folder),
        "vae": vae.build(tiny_model_dir / "base"),
    }
    addresses = {name: f"127.0.0.1:{server.port}" for name, server in stages.items()}
    front = orchestrator.build(addresses["text_encoder"], addresses["base"], addresses["refiner"], addresses["vae"])
    yield f"127.0.0.1:{front.port}", folder
    front.stop(0)
    for server in stages.values():
        server.stop(0)
