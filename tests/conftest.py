from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

# The official SDXL configs, beside the checkout (../shared/reference), as in CI.
REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

# Our scheduler names -> the diffusers scheduler class and the from_config overrides that make it.
DIFFUSERS_SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    assert REFERENCE_DIR.is_dir(), f"the official SDXL configs are expected at {REFERENCE_DIR}"
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with the tiny base/, refiner/, inpainting/ and sd_xl_{base,refiner}_tiny.safetensors."""
    from sdxl_core.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")
