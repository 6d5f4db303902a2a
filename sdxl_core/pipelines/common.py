"""What every SDXL pipeline shares: its components, loading them, and the stages around denoising.

A pipeline object holds models and settings only; each call keeps its state in locals,
so threads may share one pipeline (unlike diffusers, whose pipelines store per-call state).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from sdxl_core.denoise import Conditioning
from sdxl_core.latents import VAE_SCALE_FACTOR
from sdxl_core.loading import SDXLComponents, load_components, load_single_file, standalone
from sdxl_core.loading.folder import load_text_encoder, load_unet, load_vae, read_json
from sdxl_core.loading.hub import model_folder
from sdxl_core.noise import GeneratorLike
from sdxl_core.offload import enable_model_cpu_offload
from sdxl_core.pipelines.lora import LoraMixin
from sdxl_core.prompts import Prompt, PromptEmbeddings, encode_prompt
from sdxl_core.request import DenoisePlan, MicroConditioning, Mode, plan_denoise
from sdxl_core.stages import decode_stage
from sdxl_core.tokenizers import load_tokenizer
from sdxl_core.watermark import watermark_available

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
LOADERS = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder, "text_encoder_2": load_text_encoder}


@dataclass(frozen=True)
class SDXLPipelineOutput:
    """A list of PIL images, an array (B, H, W, 3), or a tensor (B, 3, H, W) / latents (B, 4, H/8, W/8)."""

    images: Any


def resolve_generator(generator: GeneratorLike, seed: int | None) -> GeneratorLike:
    """An explicit generator, or a CPU generator seeded with `seed` (the DESIGN.md seed rule)."""
    if seed is None:
        return generator
    if generator is not None:
        raise ValueError("pass either `generator` or `seed`, not both")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"`seed` must be an integer, got {seed!r}")
    return torch.Generator("cpu").manual_seed(seed)


def check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0 or value % VAE_SCALE_FACTOR:
        raise ValueError(f"`{name}` must be a positive multiple of {VAE_SCALE_FACTOR}, got {value!r}")


def _listed(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and entry[0] is not None


def load_missing(path: str | Path, given: dict[str, Any], torch_dtype, variant, device) -> SDXLComponents:
    """A diffusers folder's components, reading from disk only those not in `given`."""
    if not given:
        return load_components(path, torch_dtype=torch_dtype, variant=variant, device=device)
    root = model_folder(path, variant)
    index = read_json(root / "model_index.json")
    loaded = dict(given)
    for name in COMPONENTS:
        if name in loaded or not _listed(index, name):
            continue
        if name.startswith("tokenizer"):
            loaded[name] = load_tokenizer(root / name)
        else:
            loaded[name] = LOADERS[name](root / name, torch_dtype=torch_dtype, variant=variant, device=device)
    return SDXLComponents(
        **{name: loaded.get(name) for name in COMPONENTS},
        scheduler_config=read_json(root / "scheduler" / "scheduler_config.json"),
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
    )


def load_given(components: dict[str, Any], torch_dtype, device) -> dict[str, Any]:
    """Passed components as they are, but a `vae` given as a path (a VAE folder, single file or hub id)
    loaded at the pipeline's dtype and device, as diffusers users pass AutoencoderKL.from_pretrained(...)."""
    vae = components.get("vae")
    if isinstance(vae, (str, PathLike)):
        return components | {"vae": standalone.load_vae(vae, torch_dtype=torch_dtype, device=device)}
    return components


class PipelineBase(LoraMixin):
    """Components and settings of an SDXL pipeline; subclasses add `__call__`."""

    def __init__(
        self, unet, vae, text_encoder_2, tokenizer_2, text_encoder=None, tokenizer=None,
        scheduler_config: dict | None = None, force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        """`add_watermarker` None: on when invisible-watermark is installed, as diffusers."""
        self.unet, self.vae = unet, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler_config = dict(scheduler_config or {})
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        if add_watermarker and not watermark_available():
            raise ImportError("add_watermarker=True needs the invisible-watermark package (pip install invisible-watermark)")
        self.add_watermarker = watermark_available() if add_watermarker is None else add_watermarker
        self._offload_device: torch.device | None = None
        self._offload_hooks: list = []
        self._init_loras()

    @classmethod
    def from_components(cls, components: SDXLComponents, add_watermarker: bool | None = None, **overrides):
        """A pipeline over loaded components; `overrides` replace single ones (e.g. a shared vae)."""
        c = {f.name: getattr(components, f.name) for f in fields(components)} | overrides
        return cls(**c, add_watermarker=add_watermarker)

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None, variant: str | None = None,
                        device: torch.device | str = "cpu", add_watermarker: bool | None = None, **components):
        """Load a diffusers folder; components passed by name (e.g. vae=base.vae) are shared, not loaded.

        `vae` may also be a path or hub id of a VAE alone (a folder or single file, as
        sdxl_core.loading.load_vae reads it), loaded at `torch_dtype` on `device`.
        """
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise TypeError(f"unknown component(s) {sorted(unknown)}; components are {COMPONENTS}")
        given = load_given(components, torch_dtype, device)
        return cls.from_components(load_missing(path, given, torch_dtype, variant, device), add_watermarker)

    @classmethod
    def from_single_file(cls, path: str | Path, torch_dtype: torch.dtype | None = None, config: str | Path | None = None,
                         device: torch.device | str = "cpu", add_watermarker: bool | None = None, **components):
        """Load an original checkpoint (sd_xl_base_1.0.safetensors); passed components (a `vae` path too) replace
        loaded ones."""
        loaded = load_single_file(path, torch_dtype=torch_dtype, device=device, config=config)
        return cls.from_components(loaded, add_watermarker, **load_given(components, torch_dtype, device))

    @property
    def models(self) -> list[torch.nn.Module]:
        """The models in the order a request runs them (text encoders, UNet, VAE); absent ones left out."""
        return [m for m in (self.text_encoder, self.text_encoder_2, self.unet, self.vae) if m is not None]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move (and cast) every model, as diffusers' `pipe.to("cuda")`; models shared with another pipeline move too."""
        if self._offload_hooks:
            raise RuntimeError("this pipeline uses model CPU offload; models move on their own")
        for model in self.models:
            model.to(device=device, dtype=dtype)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda"):
        """Keep models on the CPU and move each to `device` only while it runs (diffusers' method of that name)."""
        if self._offload_hooks:
            return self
        for model in self.models:
            model.to("cpu")
        self._offload_device = torch.device(device)
        self._offload_hooks = enable_model_cpu_offload(self.models, self._offload_device)
        return self

    @property
    def device(self) -> torch.device:
        """Where a request's tensors live: the offload device when offloading, else the UNet's."""
        return self._offload_device or self.unet.device

    @property
    def default_size(self) -> int:
        """Pixels per side when height / width are not given: the UNet's sample_size * 8."""
        return self.unet.config.sample_size * VAE_SCALE_FACTOR

    def encode_prompt(
        self, prompt: Prompt, prompt_2: Prompt | None, negative_prompt: Prompt | None,
        negative_prompt_2: Prompt | None, num_images_per_prompt: int, guided: bool, prompt_syntax: str = "plain",
    ) -> PromptEmbeddings:
        """sdxl_core.prompts.encode_prompt over this pipeline's encoders; `prompt_syntax` "plain" or "compel"."""
        return encode_prompt(
            [self.text_encoder, self.text_encoder_2], [self.tokenizer, self.tokenizer_2], prompt, prompt_2,
            negative_prompt, negative_prompt_2, num_images_per_prompt, guided, self.force_zeros_for_empty_prompt,
            device=self.device, dtype=self.unet.dtype, prompt_syntax=prompt_syntax,
        )

    def plan(self, mode: Mode, num_inference_steps: int, scheduler: str, guidance_scale: float | None,
             guidance_rescale: float, **range_args) -> DenoisePlan:
        """The call's denoise over this pipeline's UNet and scheduler config (request semantics)."""
        return plan_denoise(self.unet.config, self.scheduler_config, mode, num_inference_steps=num_inference_steps,
                            scheduler=scheduler, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                            device=self.device, **range_args)

    def finish(self, denoise_fn, plan: DenoisePlan, embeddings: PromptEmbeddings, micro: MicroConditioning,
               size: tuple[int, int], generator: GeneratorLike, output_type: str, on_step, **inputs):
        """The pipelines' shared tail: micro-conditioning, the mode's denoise (a sdxl_core.stages function), decode."""
        time_ids = micro.time_ids(self.unet.config, *size, from_image=plan.mode is not Mode.TEXT2IMG)
        conditioning = Conditioning.from_prompt(embeddings, *time_ids)
        latents = denoise_fn(self.unet, plan, conditioning, generator=generator, device=self.device,
                             dtype=self.unet.dtype, on_step=on_step, **inputs)
        return SDXLPipelineOutput(self.decode(latents, output_type))

    def decode(self, latents: torch.Tensor, output_type: str):
        """Latents -> images of `output_type` (VAE decode, watermark, postprocess); "latent" returns them as they are."""
        if output_type != "latent":
            latents = decode_stage(self.vae, latents, self.add_watermarker, output_type)
        for hook in self._offload_hooks:  # as diffusers' maybe_free_model_hooks: all back to the CPU
            hook.offload()
        return latents

