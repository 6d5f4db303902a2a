"""What the tests compare against: the official SDXL configs and diffusers' schedulers by our names."""

from pathlib import Path

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

# The official SDXL configs, copied into the repository (tests/data/reference/README.md names their source).
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"

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
