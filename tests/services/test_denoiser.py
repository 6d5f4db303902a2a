"""Denoiser (and Vae) servers chained by hand give exactly the in-process pipelines' latents and pixels;
bad requests are INVALID_ARGUMENT naming the field; a cancelled call stops at its next step."""

import io
import math
import time

import grpc
import numpy as np
import PIL.Image
import pytest
import torch
from google.protobuf import struct_pb2

from sdxl.v1 import denoiser_pb2, denoiser_pb2_grpc, tensor_pb2, vae_pb2, vae_pb2_grpc
from sdxl_core.pipelines import SDXLImg2ImgPipeline, SDXLInpaintPipeline, SDXLPipeline
from sdxl_services import denoiser, vae
from sdxl_wire.tensors import TensorAssembler, to_proto_chunks

PROMPT = "a red fox in the snow"
SEED = 21


# --- servers, pipelines and clients


@pytest.fixture(scope="module")
def pipes(tiny_model_dir):
    base = SDXLPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)
    names = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    shared = {n: getattr(base, n) for n in names}
    return {
        "base": base,
        "base_img2img": SDXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False, **shared),
        "base_inpaint": SDXLInpaintPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False, **shared),
        "refiner": SDXLImg2ImgPipeline.from_pretrained(
            tiny_model_dir / "refiner", add_watermarker=False, text_encoder_2=base.text_encoder_2, vae=base.vae),
        "inpainting": SDXLInpaintPipeline.from_pretrained(tiny_model_dir / "inpainting", add_watermarker=False),
    }


@pytest.fixture(scope="module")
def base_servicer(tiny_model_dir):
    return denoiser.DenoiserServicer(*denoiser.load_denoiser(tiny_model_dir / "base"))


@pytest.fixture(scope="module")
def servers(tiny_model_dir, base_servicer):
    started = {
        "base": denoiser.make_server(base_servicer),
        "refiner": denoiser.build(tiny_model_dir / "refiner"),
        "inpainting": denoiser.build(tiny_model_dir / "inpainting"),
        "vae": vae.build(tiny_model_dir / "base"),
        "inpainting_vae": vae.build(tiny_model_dir / "inpainting"),
    }
    yield started
    for server in started.values():
        server.stop(0)


def _channel(server):
    return grpc.insecure_channel(f"localhost:{server.port}")


def embeddings(pipe, guided=True, prompt=PROMPT) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt embeddings, as the text-encoder stage would send them."""
    e = pipe.encode_prompt(prompt, None, None, None, 1, guided)
    return {name: t for name, t in vars(e).items() if t is not None}


def denoise(server, header: denoiser_pb2.DenoiseHeader, tensors: dict, timeout=120):
    """One Denoise call: (final latents, progress events)."""
    messages = [denoiser_pb2.DenoiseRequest(header=header)]
    messages += [denoiser_pb2.DenoiseRequest(chunks=[c]) for name, t in tensors.items()
                 for c in to_proto_chunks(name, t)]
    stub = denoiser_pb2_grpc.DenoiserStub(_channel(server))
    progress, assembler = [], TensorAssembler()
    for response in stub.Denoise(iter(messages), timeout=timeout):
        if response.HasField("progress"):
            progress.append(response.progress)
        elif response.HasField("chunk"):
            assembler.add(response.chunk)
    return assembler.finish()["latents"], progress


def decode(server, latents: torch.Tensor) -> np.ndarray:
    """Vae.Decode without watermark, as RAW uint8 (B, H, W, 3)."""
    header = vae_pb2.DecodeHeader(watermark=False, output_format=vae_pb2.OUTPUT_FORMAT_RAW)
    messages = [vae_pb2.DecodeRequest(header=header)]
    messages += [vae_pb2.DecodeRequest(chunks=[c]) for c in to_proto_chunks("latents", latents)]
    stub = vae_pb2_grpc.VaeStub(_channel(server))
    return _assemble(r.chunk for r in stub.Decode(iter(messages), timeout=60))["images"].numpy()


def _assemble(chunks) -> dict[str, torch.Tensor]:
    assembler = TensorAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


def png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode(server, header: vae_pb2.EncodeHeader, image: PIL.Image.Image, mask: PIL.Image.Image | None = None):
    """Vae.Encode of one PNG image (and mask): (tensors, draws)."""
    messages = [vae_pb2.EncodeRequest(header=header)]
    messages.append(vae_pb2.EncodeRequest(image=tensor_pb2.ImageChunk(
        index=0, total_bytes=len(png(image)), offset=0, data=png(image))))
    if mask is not None:
        messages.append(vae_pb2.EncodeRequest(mask_image=tensor_pb2.ImageChunk(
            index=0, total_bytes=len(png(mask)), offset=0, data=png(mask))))
    responses = list(vae_pb2_grpc.VaeStub(_channel(server)).Encode(iter(messages), timeout=60))
    return _assemble(c for r in responses for c in r.chunks), responses[0].draws


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(i) for i in images])


@pytest.fixture(scope="module")
def image():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mask():
    m = np.zeros((64, 64), dtype=np.uint8)
    m[16:48, 8:40] = 255
    return PIL.Image.fromarray(m)


# --- parity with the pipelines


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "euler_a"])
def test_text2img_chain_equals_the_pipeline(servers, pipes, scheduler):
    header = denoiser_pb2.DenoiseHeader(scheduler=scheduler, num_inference_steps=4, guidance_scale=5.0, seed=SEED,
                                        height=64, width=64)
    latents, progress = denoise(servers["base"], header, embeddings(pipes["base"]))
    kwargs = dict(num_inference_steps=4, scheduler=scheduler, seed=SEED, height=64, width=64)
    expected = pipes["base"](PROMPT, output_type="latent", **kwargs).images
    assert torch.equal(latents, expected)
    assert [(p.step, p.total) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert np.array_equal(decode(servers["vae"], latents), pixels(pipes["base"](PROMPT, **kwargs).images))


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_base_to_refiner_handoff_at_0_8_equals_the_pipelines(servers, pipes, scheduler):
    common = dict(scheduler=scheduler, num_inference_steps=6, guidance_scale=5.0, seed=SEED)
    base_header = denoiser_pb2.DenoiseHeader(denoising_end=0.8, height=64, width=64, **common)
    handed, _ = denoise(servers["base"], base_header, embeddings(pipes["base"]))
    refined, progress = denoise(servers["refiner"], denoiser_pb2.DenoiseHeader(denoising_start=0.8, **common),
                                embeddings(pipes["refiner"]) | {"image_latents": handed})
    kwargs = dict(num_inference_steps=6, scheduler=scheduler, seed=SEED)
    expected_handed = pipes["base"](PROMPT, denoising_end=0.8, output_type="latent", **kwargs).images
    expected = pipes["refiner"](PROMPT, image=expected_handed, denoising_start=0.8, **kwargs).images
    assert torch.equal(handed, expected_handed)
    assert 0 < len(progress) < 6
    assert np.array_equal(decode(servers["vae"], refined), pixels(expected))


def test_refiner_after_a_full_base_run_at_strength_0_3_equals_the_pipelines(servers, pipes):
    common = dict(scheduler="euler_a", num_inference_steps=10, guidance_scale=5.0, seed=SEED)
    base_latents, _ = denoise(servers["base"], denoiser_pb2.DenoiseHeader(height=64, width=64, **common),
                              embeddings(pipes["base"]))
    refined, progress = denoise(servers["refiner"], denoiser_pb2.DenoiseHeader(strength=0.3, **common),
                                embeddings(pipes["refiner"]) | {"image_latents": base_latents})
    kwargs = dict(num_inference_steps=10, scheduler="euler_a", seed=SEED)
    expected = pipes["refiner"](PROMPT, image=base_latents, strength=0.3, output_type="latent", **kwargs).images
    assert len(progress) == 3
    assert torch.equal(refined, expected)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_img2img_from_pixels_equals_the_pipeline(servers, pipes, image, scheduler):
    encoded, draws = encode(servers["vae"], vae_pb2.EncodeHeader(seed=SEED, batch_size=1), image)
    assert draws.image_samples == 1 and draws.masked_image_samples == 0
    header = denoiser_pb2.DenoiseHeader(scheduler=scheduler, num_inference_steps=5, guidance_scale=5.0, seed=SEED,
                                        strength=0.6, encode_draws=draws)
    latents, _ = denoise(servers["base"], header, embeddings(pipes["base"]) | encoded)
    expected = pipes["base_img2img"](PROMPT, image=image, strength=0.6, num_inference_steps=5, scheduler=scheduler,
                                     seed=SEED).images
    assert np.array_equal(decode(servers["vae"], latents), pixels(expected))


def test_inpaint_with_the_base_unet_equals_the_pipeline(servers, pipes, image, mask):
    encoded, draws = encode(servers["vae"], vae_pb2.EncodeHeader(seed=SEED, batch_size=1), image, mask)
    assert sorted(encoded) == ["image_latents", "mask"] and draws.masked_image_samples == 1
    header = denoiser_pb2.DenoiseHeader(scheduler="euler_a", num_inference_steps=5, guidance_scale=7.5, seed=SEED,
                                        strength=0.8, encode_draws=draws)
    latents, _ = denoise(servers["base"], header, embeddings(pipes["base_inpaint"]) | encoded)
    expected = pipes["base_inpaint"](PROMPT, image=image, mask_image=mask, height=64, width=64, strength=0.8,
                                     num_inference_steps=5, scheduler="euler_a", seed=SEED).images
    assert np.array_equal(decode(servers["vae"], latents), pixels(expected))


@pytest.mark.parametrize("strength", [0.8, 1.0])
def test_inpaint_with_a_9_channel_unet_equals_the_pipeline(servers, pipes, image, mask, strength):
    vae_header = vae_pb2.EncodeHeader(seed=SEED, batch_size=1, masked_image_latents=True,
                                      skip_image_latents=strength == 1.0)
    encoded, draws = encode(servers["inpainting_vae"], vae_header, image, mask)
    assert ("image_latents" in encoded) == (strength < 1.0)
    header = denoiser_pb2.DenoiseHeader(scheduler="euler_a", num_inference_steps=5, guidance_scale=7.5, seed=SEED,
                                        strength=strength, encode_draws=draws)
    latents, _ = denoise(servers["inpainting"], header, embeddings(pipes["inpainting"]) | encoded)
    expected = pipes["inpainting"](PROMPT, image=image, mask_image=mask, height=64, width=64, strength=strength,
                                   num_inference_steps=5, scheduler="euler_a", seed=SEED).images
    assert np.array_equal(decode(servers["inpainting_vae"], latents), pixels(expected))


# --- bad requests


def struct(**fields) -> struct_pb2.Struct:
    options = struct_pb2.Struct()
    options.update(fields)
    return options


def _valid():
    return dict(scheduler="euler", num_inference_steps=2, guidance_scale=5.0, seed=1, height=64, width=64)


BAD = {
    "wrong_context_dim": ({}, {"prompt_embeds": torch.zeros(1, 77, 33)}, "prompt_embeds"),
    "wrong_dtype": ({}, {"pooled_prompt_embeds": torch.int64}, "pooled_prompt_embeds"),
    "batch_mismatch": ({}, {"latents": torch.zeros(2, 4, 8, 8)}, "latents"),
    "missing_negatives": ({}, {"negative_prompt_embeds": None}, "negative_prompt_embeds"),
    "steps_negative": ({"num_inference_steps": -1}, {}, "num_inference_steps"),
    "steps_100000": ({"num_inference_steps": 100000}, {}, "num_inference_steps"),
    "nan_guidance": ({"guidance_scale": math.nan}, {}, "guidance_scale"),
    "strength_1_5": ({"strength": 1.5}, {}, "strength"),
    "start_after_end": ({"denoising_start": 0.8, "denoising_end": 0.5}, {}, "denoising_start"),
    "unknown_scheduler": ({"scheduler": "karras_magic"}, {}, "scheduler"),
    "size_not_multiple_of_8": ({"height": 60}, {}, "height"),
    "over_max_pixels_without_latents": ({"height": 8192, "width": 8192}, {}, "--max-pixels"),
    "over_max_pixels_with_latents": ({}, {"latents": torch.zeros(1, 4, 520, 520)}, "--max-pixels"),
    "nan_latents": ({}, {"latents": torch.full((1, 4, 8, 8), math.nan)}, "latents"),
    "inf_prompt_embeds": ({}, {"prompt_embeds": torch.full((1, 77, 80), math.inf)}, "prompt_embeds"),
    "nan_image_latents": ({"strength": 0.5}, {"image_latents": torch.full((1, 4, 8, 8), math.nan)}, "image_latents"),
    "empty_image_latents": ({"strength": 0.5}, {"image_latents": torch.zeros(0, 4, 8, 8)}, "image_latents"),
    "no_train_timesteps": ({"scheduler_options": struct(num_train_timesteps=0)}, {}, "num_train_timesteps"),
    "a_billion_train_timesteps": ({"scheduler_options": struct(num_train_timesteps=1e9)}, {}, "num_train_timesteps"),
    "negative_beta_start": ({"scheduler_options": struct(beta_start=-0.1)}, {}, "beta_start"),
    "huge_steps_offset": ({"scheduler": "ddim", "scheduler_options": struct(steps_offset=1e12)}, {}, "steps_offset"),
    "unknown_option": ({"scheduler_options": struct(warp=1)}, {}, "timestep_spacing"),  # the accepted ones
    "infinite_option": ({"scheduler_options": struct(beta_end=math.inf)}, {}, "finite"),
    "no_step_in_range": ({"scheduler": "dpmpp_2m", "num_inference_steps": 1, "denoising_start": 0.8},
                         {"image_latents": torch.zeros(1, 4, 8, 8)}, "num_inference_steps"),
}



@pytest.mark.parametrize("fields,tensors,field", BAD.values(), ids=BAD.keys())
def test_bad_requests_are_invalid_argument_naming_the_field_and_the_next_one_runs(servers, pipes, fields, tensors,
                                                                                  field):
    good = embeddings(pipes["base"])
    bad = {k: v for k, v in (good | tensors).items() if v is not None}
    if tensors.get("pooled_prompt_embeds") is torch.int64:
        bad["pooled_prompt_embeds"] = good["pooled_prompt_embeds"].to(torch.int64)
    with pytest.raises(grpc.RpcError) as error:
        denoise(servers["base"], denoiser_pb2.DenoiseHeader(**(_valid() | fields)), bad)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    latents, _ = denoise(servers["base"], denoiser_pb2.DenoiseHeader(**_valid()), good)
    assert latents.shape == (1, 4, 8, 8)


def test_an_empty_batch_is_invalid_argument(servers, pipes):
    empty = {name: t[:0] for name, t in embeddings(pipes["base"]).items()}
    with pytest.raises(grpc.RpcError) as error:
        denoise(servers["base"], denoiser_pb2.DenoiseHeader(**_valid()), empty)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch" in error.value.details()


def test_max_pixels_bounds_the_image_with_or_without_latents(pipes, base_servicer):
    small = denoiser.DenoiserServicer(base_servicer.unet, base_servicer.scheduler_config, max_pixels=64 * 64)
    tensors = {name: t for name, t in embeddings(pipes["base"]).items()}
    header = denoiser_pb2.DenoiseHeader(**(_valid() | {"height": 64, "width": 72}))
    with pytest.raises(ValueError, match="--max-pixels"):
        small.prepare(header, tensors)
    with pytest.raises(ValueError, match="--max-pixels"):
        small.prepare(denoiser_pb2.DenoiseHeader(**_valid()), tensors | {"latents": torch.zeros(1, 4, 8, 9)})
    assert small.prepare(denoiser_pb2.DenoiseHeader(**_valid()), tensors).latent_size == (8, 8)


# --- cancellation


def test_a_cancelled_call_stops_at_its_next_step_and_frees_the_slot(servers, pipes, base_servicer):
    forwards = []
    hook = base_servicer.unet.register_forward_hook(lambda *_: forwards.append(1))
    header = denoiser_pb2.DenoiseHeader(**(_valid() | {"num_inference_steps": 1000}))
    messages = [denoiser_pb2.DenoiseRequest(header=header)]
    messages += [denoiser_pb2.DenoiseRequest(chunks=[c]) for name, t in embeddings(pipes["base"]).items()
                 for c in to_proto_chunks(name, t)]
    call = denoiser_pb2_grpc.DenoiserStub(_channel(servers["base"])).Denoise(iter(messages), timeout=120)
    assert next(call).HasField("admitted")
    first = next(call)
    assert (first.progress.step, first.progress.total) == (1, 1000)
    call.cancel()
    latents, _ = denoise(servers["base"], denoiser_pb2.DenoiseHeader(**_valid()), embeddings(pipes["base"]))
    hook.remove()
    assert latents.shape == (1, 4, 8, 8)  # ran once the cancelled call gave its slot back
    assert len(forwards) - _valid()["num_inference_steps"] < 100  # the cancelled call stopped long before its 1000 steps


STEP_S = 0.2  # the slow UNet's sleep per call: far above the tiny UNet's own time, even on a loaded machine
DEADLINE_S = 1.0


@pytest.fixture
def slow_base(tiny_model_dir):
    """A base Denoiser server whose UNet sleeps STEP_S per call, and the time.monotonic() each call started."""
    servicer = denoiser.DenoiserServicer(*denoiser.load_denoiser(tiny_model_dir / "base"))
    starts = []

    def slow(module, args):
        starts.append(time.monotonic())
        time.sleep(STEP_S)

    servicer.unet.register_forward_pre_hook(slow)
    server = denoiser.make_server(servicer)
    yield server, starts
    server.stop(0)


def test_a_call_past_its_deadline_stops_at_its_next_step(slow_base, pipes):
    server, starts = slow_base
    header = denoiser_pb2.DenoiseHeader(**(_valid() | {"num_inference_steps": 1000}))
    messages = [denoiser_pb2.DenoiseRequest(header=header)]
    messages += [denoiser_pb2.DenoiseRequest(chunks=[c]) for name, t in embeddings(pipes["base"]).items()
                 for c in to_proto_chunks(name, t)]
    deadline = time.monotonic() + DEADLINE_S  # no later than the server's, which starts on arrival
    with pytest.raises(grpc.RpcError) as error:
        list(denoiser_pb2_grpc.DenoiserStub(_channel(server)).Denoise(iter(messages), timeout=DEADLINE_S))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(5 * STEP_S)  # a stage that ignored its deadline would start ~5 more steps meanwhile
    on_time = sum(t <= deadline for t in starts)
    assert on_time >= 1, "the call ended before its first step"
    assert len(starts) - on_time <= 1, f"{len(starts) - on_time} steps started after the deadline"
    latents, _ = denoise(server, denoiser_pb2.DenoiseHeader(**_valid()), embeddings(pipes["base"]))
    assert latents.shape == (1, 4, 8, 8)  # and the next call runs


def test_previews_come_with_each_step_when_asked_for(servers, pipes):
    header = denoiser_pb2.DenoiseHeader(**(_valid() | {"preview": True}))
    _, progress = denoise(servers["base"], header, embeddings(pipes["base"]))
    assert [(tuple(p.preview.shape), p.preview.dtype) for p in progress] == [((1, 8, 8, 3), tensor_pb2.DTYPE_UINT8)] * 2


def test_scheduler_options_of_a_wrong_value_are_invalid_argument(servers, pipes):
    options = struct_pb2.Struct()
    options.update({"timestep_spacing": "sideways"})
    header = denoiser_pb2.DenoiseHeader(**_valid(), scheduler_options=options)
    with pytest.raises(grpc.RpcError) as error:
        denoise(servers["base"], header, embeddings(pipes["base"]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timestep_spacing" in error.value.details()


# --- metrics


def test_each_step_and_the_batch_size_are_recorded_for_the_stage(servers, pipes):
    import prometheus_client

    def sample(name: str, **labels) -> float:
        return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0

    steps, batch = sample("sdxl_step_duration_seconds_count", stage="base"), sample(
        "sdxl_batch_size_sum", stage="base", method="Denoise")
    prompt = ["a cat", "a dog", "a cow"]
    tensors = embeddings(pipes["base"], prompt=prompt)
    _, progress = denoise(servers["base"], denoiser_pb2.DenoiseHeader(**(_valid() | {"num_inference_steps": 3})),
                          tensors)
    assert len(progress) == 3
    assert sample("sdxl_step_duration_seconds_count", stage="base") == steps + 3
    assert sample("sdxl_batch_size_sum", stage="base", method="Denoise") == batch + len(prompt)
