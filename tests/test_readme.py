"""Every Python example in the README runs, on the tiny model standing in for the real weights."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_core.configs import TINY_BASE_UNET
from sdxl_core.latents import VAE_SCALE_FACTOR
from sdxl_core.loading import load_components
from sdxl_core.loading.folder import save_components

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
INIT_SIZE = (64, 64)  # init.png and mask.png, which the img2img and inpainting examples open


def with_fp16_variant(source: Path, target: Path) -> Path:
    """A copy of a tiny diffusers folder that also holds `*.fp16.safetensors` files, as the hub's do."""
    shutil.copytree(source, target)
    components = load_components(source, torch_dtype=torch.float16)
    save_components(components, target, variant="fp16")
    return target


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory, lora_files) -> dict[str, str]:
    """README model paths -> code naming the tiny stand-ins (single files need the tiny architecture's config)."""
    root = tmp_path_factory.mktemp("readme-models")
    base = with_fp16_variant(tiny_model_dir / "base", root / "base")
    refiner = with_fp16_variant(tiny_model_dir / "refiner", root / "refiner")
    base_file = f"{str(tiny_model_dir / 'sd_xl_base_tiny.safetensors')!r}, config={str(base)!r}"
    return {
        "/models/stable-diffusion-xl-base-1.0": repr(str(base)),
        "/models/stable-diffusion-xl-refiner-1.0": repr(str(refiner)),
        "/models/sdxl-vae-fp16-fix": repr(str(base / "vae")),
        "/models/sd_xl_base_1.0.safetensors": base_file,
        "/models/my_finetune.safetensors": repr(str(tiny_model_dir / "sd_xl_base_tiny.safetensors")),
        "./sd_xl_base_1.0.safetensors": base_file,
        "/models/loras/papercut.safetensors": repr(str(lora_files["style"])),
        "/models/loras/pixel-art.safetensors": repr(str(lora_files["detail"])),
        "./sd_xl_refiner_1.0.safetensors":
            f"{str(tiny_model_dir / 'sd_xl_refiner_tiny.safetensors')!r}, config={str(refiner)!r}",
    }


def localize(code: str, models: dict[str, str]) -> str:
    """Model paths -> the tiny models; CUDA -> CPU (fp16 weights are cast to float32 there)."""
    for path, local in models.items():
        code = code.replace(f'"{path}"', local)
    code = re.sub(r'"cuda(:\d+)?"', '"cpu"', code)
    code = code.replace("enable_model_cpu_offload()", 'enable_model_cpu_offload("cpu")')
    return code.replace("torch_dtype=torch.float16", "torch_dtype=torch.float32")


def asked_size(code: str) -> tuple[int, int]:
    """(width, height) of an example's image: its height= and width=, else init.png's, else the model's default."""
    height, width = (re.search(rf"\b{name}=(\d+)", code) for name in ("height", "width"))
    if height and width:
        return int(width[1]), int(height[1])
    if "init_image" in code:
        return INIT_SIZE
    side = TINY_BASE_UNET.sample_size * VAE_SCALE_FACTOR
    return side, side


def test_the_readme_has_every_example_of_the_sdxl_usage_page():
    code = "\n".join(BLOCKS)
    for usage in ["SDXLPipeline.from_pretrained", "SDXLImg2ImgPipeline", "SDXLInpaintPipeline", "denoising_end=",
                  "denoising_start=", 'output_type="latent"', "prompt_2=", "from_single_file", "text_encoder_2=",
                  "enable_model_cpu_offload()", "torch.compile(", "add_watermarker=False", 'variant="fp16"']:
        assert usage in code, usage


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, models, tiny_model_dir, tmp_path, monkeypatch, request):
    if "sdxl_client" in code:  # a client example: against the tiny stages served in this process
        address = request.getfixturevalue("lora_orchestrator")[0] if "loras=" in code else \
            request.getfixturevalue("orchestrator_address")
        code = code.replace('"localhost:50051"', repr(address))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDXL_MODEL_DIR", str(tiny_model_dir))
    Image.new("RGB", INIT_SIZE, (120, 80, 40)).save("init.png")
    mask = Image.new("RGB", INIT_SIZE)
    mask.paste((255, 255, 255), (16, 16, 48, 48))
    mask.save("mask.png")
    namespace = {}
    exec(compile(localize(code, models), "README.md", "exec"), namespace)
    image = namespace["result"].images[0] if "sdxl_client" in code else namespace.get("image")
    if image is not None:  # every pipeline example ends with an image, as in the diffusers docs
        assert isinstance(image, Image.Image)
        assert (image.size, image.mode) == (asked_size(code), "RGB")
        assert np.asarray(image).std() > 0, "a constant image"
