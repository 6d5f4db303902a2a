"""The orchestrator over real stage servers: the pipelines' exact images, validation, deadlines, cancellation, retry."""

import io
import logging
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from sdxl.v1 import orchestrator_pb2, orchestrator_pb2_grpc, stage_pb2, tensor_pb2
from sdxl_core.pipelines import SDXLImg2ImgPipeline, SDXLInpaintPipeline, SDXLPipeline
from sdxl_services import channels, denoiser, orchestrator, text_encoder, vae
from sdxl_services.generate_params import ENSEMBLE, REFINE
from tests.services.test_denoise_engine import Recorder

Stage = orchestrator_pb2.Stage
SEED = 1234
WAIT_S = 30.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stub(orchestrator_address):
    return orchestrator_pb2_grpc.OrchestratorStub(grpc.insecure_channel(orchestrator_address))


@pytest.fixture(scope="module")
def pipelines(tiny_model_dir):
    base = SDXLPipeline.from_pretrained(tiny_model_dir / "base")
    refiner = SDXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "refiner")
    return base, refiner


def _params(**fields) -> orchestrator_pb2.GenerateParams:
    defaults = dict(prompt=["a red cube on a table"], height=64, width=64, num_inference_steps=4, seed=SEED)
    return orchestrator_pb2.GenerateParams(**(defaults | fields))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _generate(stub, params, timeout=WAIT_S, image=None, mask_image=None, **kwargs):
    """(progress events, images as uint8 arrays, result) of one Generate."""
    progress, images, result = [], {}, None
    requests = [orchestrator_pb2.GenerateRequest(params=params)]
    for name, value in (("image", image), ("mask_image", mask_image)):
        if value is not None:
            data = _png(value)
            chunk = tensor_pb2.ImageChunk(index=0, total_bytes=len(data), offset=0, data=data)
            requests.append(orchestrator_pb2.GenerateRequest(**{name: chunk}))
    for response in stub.Generate(iter(requests), timeout=timeout, **kwargs):
        kind = response.WhichOneof("event")
        if kind == "progress":
            progress.append(response.progress)
        elif kind == "image":
            images[response.image.index] = images.get(response.image.index, b"") + response.image.data
        elif kind == "result":
            result = response.result
    arrays = [np.array(Image.open(io.BytesIO(images[i])).convert("RGB")) for i in sorted(images)]
    return progress, arrays, result


def _arrays(images) -> list[np.ndarray]:
    return [np.array(image) for image in images]


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "euler_a"])
def test_text2img_images_equal_the_pipelines(stub, pipelines, scheduler):
    base, _ = pipelines
    progress, images, result = _generate(stub, _params(scheduler=scheduler, num_images_per_prompt=2))
    want = base("a red cube on a table", height=64, width=64, num_inference_steps=4, seed=SEED, scheduler=scheduler,
                num_images_per_prompt=2).images
    assert len(images) == 2
    for got, expected in zip(images, _arrays(want)):
        np.testing.assert_array_equal(got, expected)
    assert (result.seed, result.num_images) == (SEED, 2)
    base_steps = [(p.step, p.total) for p in progress if p.stage == Stage.STAGE_BASE]
    assert base_steps[-1][0] == base_steps[-1][1] == 4
    assert [p.stage for p in progress][0] == Stage.STAGE_ENCODE_PROMPT and progress[-1].stage == Stage.STAGE_DECODE


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "euler_a"])
def test_ensemble_at_0_8_equals_base_then_refiner_pipelines(stub, pipelines, scheduler):
    base, refiner = pipelines
    prompt = "a red cube on a table"
    _, images, _ = _generate(stub, _params(scheduler=scheduler, refiner=ENSEMBLE, high_noise_frac=0.8,
                                           num_inference_steps=5))
    latents = base(prompt, height=64, width=64, num_inference_steps=5, seed=SEED, scheduler=scheduler,
                   denoising_end=0.8, output_type="latent").images
    want = refiner(prompt, image=latents, num_inference_steps=5, seed=SEED, scheduler=scheduler,
                   denoising_start=0.8).images
    np.testing.assert_array_equal(images[0], _arrays(want)[0])


def test_refine_after_equals_base_then_refiner_img2img(stub, pipelines):
    base, refiner = pipelines
    prompt = "a red cube on a table"
    _, images, _ = _generate(stub, _params(refiner=REFINE, refiner_strength=0.3, refiner_steps=7,
                                           refiner_scheduler="euler_a"))
    latents = base(prompt, height=64, width=64, num_inference_steps=4, seed=SEED, output_type="latent").images
    want = refiner(prompt, image=latents, strength=0.3, num_inference_steps=7, seed=SEED, scheduler="euler_a").images
    np.testing.assert_array_equal(images[0], _arrays(want)[0])


@pytest.fixture(scope="module")
def init_images():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    return image, Image.fromarray(mask, mode="L")


def test_img2img_equals_the_pipeline(stub, tiny_model_dir, init_images):
    image, _ = init_images
    pipeline = SDXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "base")
    _, images, _ = _generate(stub, _params(mode=orchestrator_pb2.MODE_IMG2IMG, strength=0.6, scheduler="euler_a"),
                             image=image)
    want = pipeline("a red cube on a table", image=image, strength=0.6, num_inference_steps=4, seed=SEED,
                    scheduler="euler_a").images
    np.testing.assert_array_equal(images[0], _arrays(want)[0])


def test_inpaint_equals_the_pipeline(stub, tiny_model_dir, init_images):
    image, mask = init_images
    pipeline = SDXLInpaintPipeline.from_pretrained(tiny_model_dir / "base")
    _, images, _ = _generate(stub, _params(mode=orchestrator_pb2.MODE_INPAINT, strength=0.75, scheduler="euler_a"),
                             image=image, mask_image=mask)
    want = pipeline("a red cube on a table", image=image, mask_image=mask, strength=0.75, num_inference_steps=4,
                    seed=SEED, scheduler="euler_a").images
    np.testing.assert_array_equal(images[0], _arrays(want)[0])


@pytest.mark.parametrize("fields, named", [
    (dict(prompt=[]), "prompt"),
    (dict(height=60), "height"),
    (dict(width=4096), "width"),
    (dict(num_inference_steps=201), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(num_images_per_prompt=9), "num_images_per_prompt"),
    (dict(refiner=ENSEMBLE, high_noise_frac=1.0), "high_noise_frac"),
    (dict(refiner=REFINE, refiner_strength=0.0), "refiner_strength"),
    (dict(denoising_end=0.5, mode=orchestrator_pb2.MODE_IMG2IMG, denoising_start=0.6), "denoising_start"),
    (dict(mode=orchestrator_pb2.MODE_IMG2IMG), "image"),
    (dict(mode=orchestrator_pb2.MODE_INPAINT), "image"),
    (dict(scheduler="warp_drive"), "scheduler"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(prompt_syntax="a1111"), "prompt_syntax"),
    (dict(prompt_syntax="compel", negative_prompt=["a cat.swap(dog)"]), "negative_prompt"),
    (dict(prompt_syntax="compel", prompt=["word " * 1300]), "prompt"),  # 18 chunks: the text encoder refuses it
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_requests_are_invalid_argument_naming_the_field(stub, fields, named):
    with pytest.raises(grpc.RpcError) as error:
        _generate(stub, _params(**fields))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"`{named}`" in error.value.details()
    _, images, _ = _generate(stub, _params(num_inference_steps=1))
    assert images[0].shape == (64, 64, 3)


@pytest.mark.parametrize("refiner_mode", ["ensemble", "refine"])
def test_inpaint_with_a_refiner_equals_the_two_inpaint_pipelines(stub, tiny_model_dir, init_images, refiner_mode):
    """README "The refiner in inpainting": the refiner inpaints the base's latents under the same mask."""
    image, mask = init_images
    prompt, inpaint = "a red cube on a table", orchestrator_pb2.MODE_INPAINT
    base = SDXLInpaintPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)
    refiner = SDXLInpaintPipeline.from_pretrained(tiny_model_dir / "refiner", add_watermarker=False)
    if refiner_mode == "ensemble":
        params = _params(mode=inpaint, refiner=ENSEMBLE, high_noise_frac=0.7, num_inference_steps=5,
                         scheduler="euler", watermark=False)
        latents = base(prompt, image=image, mask_image=mask, num_inference_steps=5, denoising_end=0.7, seed=SEED,
                       scheduler="euler", output_type="latent").images
        want = refiner(prompt, image=latents, mask_image=mask, num_inference_steps=5, denoising_start=0.7, seed=SEED,
                       scheduler="euler").images
    else:
        params = _params(mode=inpaint, strength=0.75, refiner=REFINE, refiner_strength=0.5, refiner_steps=6,
                         watermark=False)
        latents = base(prompt, image=image, mask_image=mask, strength=0.75, num_inference_steps=4, seed=SEED,
                       output_type="latent").images
        want = refiner(prompt, image=latents, mask_image=mask, strength=0.5, num_inference_steps=6, seed=SEED).images
    progress, images, _ = _generate(stub, params, image=image, mask_image=mask)
    assert np.array_equal(images[0], _arrays(want)[0])
    assert any(p.stage == Stage.STAGE_REFINER for p in progress)


def test_oversized_images_are_refused(stub):
    mib = 2**20
    chunks = [orchestrator_pb2.GenerateRequest(image=tensor_pb2.ImageChunk(
        index=0, total_bytes=33 * mib, offset=i * mib, data=bytes(mib))) for i in range(33)]
    params = orchestrator_pb2.GenerateRequest(params=_params(mode=orchestrator_pb2.MODE_IMG2IMG))
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(iter([params, *chunks]), timeout=WAIT_S))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in error.value.details()


def test_an_img2img_image_past_the_size_limit_is_refused_by_the_vae_stage(stub):
    image = Image.new("RGB", (64, 2112))
    with pytest.raises(grpc.RpcError) as error:
        _generate(stub, _params(mode=orchestrator_pb2.MODE_IMG2IMG, height=0, width=0), image=image)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "2112x64" in error.value.details()


@pytest.mark.parametrize("options, named", [
    ({"num_train_timesteps": 0}, "num_train_timesteps"), ({"beta_start": -1}, "beta_start"),
    ({"warp": True}, "warp"), ({"use_karras_sigmas": "yes"}, "use_karras_sigmas"),
])
def test_bad_scheduler_options_are_invalid_argument_naming_the_key(stub, options, named):
    params = _params()
    params.scheduler_options.update(options)
    with pytest.raises(grpc.RpcError) as error:
        _generate(stub, params)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"'{named}'" in error.value.details()


def test_refiner_without_a_refiner_stage_is_failed_precondition(stages):
    server = orchestrator.build(stages["text_encoder"], stages["base"], None, stages["vae"])
    stub = orchestrator_pb2_grpc.OrchestratorStub(grpc.insecure_channel(f"localhost:{server.port}"))
    try:
        with pytest.raises(grpc.RpcError) as error:
            _generate(stub, _params(refiner=ENSEMBLE))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop(0)


class _Records(logging.Handler):
    """Every stage's one log line per request; `denoised` is set by the first Denoise line."""

    def __init__(self):
        super().__init__()
        self.lines: list[tuple[str, str, str]] = []  # (request_id, method, code)
        self.denoised = threading.Event()

    def emit(self, record):
        if hasattr(record, "method"):
            self.lines.append((record.request_id, record.method.rsplit("/", 1)[-1], record.code))
            if record.method.endswith("/Denoise"):
                self.denoised.set()

    def codes(self, method: str) -> list[str]:
        return [code for _, m, code in self.lines if m == method]


@pytest.fixture
def stage_logs():
    records = _Records()
    logger = logging.getLogger("sdxl")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(records)
    logger.setLevel(level)


def test_client_deadline_is_forwarded_and_stops_the_denoiser(stub, stage_logs):
    long = _params(num_inference_steps=200, height=512, width=512)  # far over 2 s, however fast the machine
    responses = stub.Generate(iter([orchestrator_pb2.GenerateRequest(params=long)]), timeout=2.0)
    with pytest.raises(grpc.RpcError) as error:
        for _ in responses:
            pass
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ended = time.monotonic()
    assert stage_logs.denoised.wait(WAIT_S)
    # Its own deadline or the orchestrator's cancel, whichever comes first; either way it stops at once.
    assert stage_logs.codes("Denoise") in (["DEADLINE_EXCEEDED"], ["CANCELLED"])
    assert time.monotonic() - ended < 5.0


def test_client_cancel_stops_the_base_denoiser_early(stub, stage_logs):
    responses = stub.Generate(iter([orchestrator_pb2.GenerateRequest(params=_params(num_inference_steps=200))]),
                              timeout=WAIT_S)
    for response in responses:
        if response.progress.stage == Stage.STAGE_BASE and response.progress.step >= 1:
            break
    cancelled = time.monotonic()
    responses.cancel()
    assert stage_logs.denoised.wait(WAIT_S)
    assert stage_logs.codes("Denoise") == ["CANCELLED"]
    assert time.monotonic() - cancelled < 5.0  # 200 steps would take far longer


def test_a_stopped_text_encoder_replica_is_retried_on_the_other(stages, tiny_model_dir):
    stopped = text_encoder.build(tiny_model_dir / "base")
    stopped.stop(0)
    replicas = f"{stages['text_encoder']},127.0.0.1:{stopped.port}"
    server = orchestrator.build(replicas, stages["base"], stages["refiner"], stages["vae"])
    stub = orchestrator_pb2_grpc.OrchestratorStub(grpc.insecure_channel(f"localhost:{server.port}"))
    try:
        for _ in range(3):
            _, images, _ = _generate(stub, _params(num_inference_steps=1))
            assert len(images) == 1
    finally:
        server.stop(0)


def test_channel_targets():
    assert channels.channel_target("10.0.0.1:5,10.0.0.2:6") == "ipv4:10.0.0.1:5,10.0.0.2:6"
    assert channels.channel_target("localhost:5,127.0.0.1:6") == "ipv4:127.0.0.1:5,127.0.0.1:6"
    assert channels.channel_target("[::1]:5,[::2]:6") == "ipv6:[::1]:5,[::2]:6"
    assert channels.channel_target("dns:///base.sdxl:50051") == "dns:///base.sdxl:50051"
    assert channels.channel_target("base:50051") == "base:50051"
    with pytest.raises(ValueError, match="dns:///"):
        channels.channel_target("a:1,b:2")


def test_request_id_reaches_every_stage(stub, stage_logs):
    _generate(stub, _params(num_inference_steps=1), metadata=(("x-request-id", "forward-me-1"),))
    time.sleep(0.5)  # the orchestrator logs its line after the last response went out
    methods = {method for rid, method, code in stage_logs.lines if rid == "forward-me-1" and code == "OK"}
    assert methods == {"Generate", "EncodePrompt", "Denoise", "Decode"}


def test_a_stage_error_passes_through_with_its_code_and_the_stage_named(stub):
    # int(4 * 0.05) = 0 refiner steps: only the refiner stage can tell
    with pytest.raises(grpc.RpcError) as error:
        _generate(stub, _params(refiner=REFINE, refiner_strength=0.05))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("refiner stage: ")


def test_the_orchestrator_learns_an_inpainting_base_from_describe(stages, tiny_model_dir, init_images):
    """No flag tells the orchestrator that the base is a 9-channel inpainting UNet; Describe does. Strength 1
    starts from pure noise without the image's latents, which only that UNet may do."""
    base = denoiser.build(tiny_model_dir / "inpainting")
    server = orchestrator.build(stages["text_encoder"], f"127.0.0.1:{base.port}", None, stages["vae"])
    stub = orchestrator_pb2_grpc.OrchestratorStub(grpc.insecure_channel(f"localhost:{server.port}"))
    pipeline = SDXLInpaintPipeline.from_pretrained(tiny_model_dir / "inpainting")
    image, mask = init_images
    try:
        for strength in (None, 1.0):
            fields = {} if strength is None else {"strength": strength}
            _, images, _ = _generate(stub, _params(mode=orchestrator_pb2.MODE_INPAINT, **fields), image=image,
                                     mask_image=mask)
            want = pipeline("a red cube on a table", image=image, mask_image=mask, height=64, width=64,
                            num_inference_steps=4, seed=SEED, **fields).images
            np.testing.assert_array_equal(images[0], _arrays(want)[0])
    finally:
        server.stop(0)
        base.stop(0)


def test_a_priority_outside_the_enum_is_invalid_argument_and_a_valid_one_serves(stub):
    with pytest.raises(grpc.RpcError) as error:
        _generate(stub, _params(priority=99))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in error.value.details()
    _, images, _ = _generate(stub, _params(priority=stage_pb2.PRIORITY_INTERACTIVE))
    assert images


# --- prompt_syntax="compel": contexts of 77k tokens -------------------------------------------

LONG = "a photo of a (red)1.3 cube++ on a wooden table--, with (tall)0.8 mountains behind it. " * 9  # 3 chunks


@pytest.mark.parametrize("refiner", [None, ENSEMBLE], ids=["base", "ensemble"])
def test_a_long_weighted_prompt_equals_the_pipelines_image(stub, pipelines, refiner):
    base, refiner_pipe = pipelines
    prompt_2, negative = "an oil painting, " * 60, "blurry, (dark)1.2"  # the base's context: 4 chunks, refiner's 3
    fields = dict(prompt=[LONG], prompt_2=[prompt_2], negative_prompt=[negative], prompt_syntax="compel")
    _, images, _ = _generate(stub, _params(**fields, **({"refiner": refiner} if refiner else {})))
    common = dict(negative_prompt=negative, num_inference_steps=4, seed=SEED, prompt_syntax="compel")
    if refiner is None:
        want = base(LONG, prompt_2=prompt_2, height=64, width=64, **common).images
    else:
        latents = base(LONG, prompt_2=prompt_2, height=64, width=64, denoising_end=0.8, output_type="latent",
                       **common).images
        want = refiner_pipe(LONG, image=latents, denoising_start=0.8, **common).images
    np.testing.assert_array_equal(images[0], _arrays(want)[0])


class ContextRecorder(Recorder):
    """The base UNet, recording each forward's context length beside its rows."""

    def __init__(self, unet):
        super().__init__(unet)
        self.contexts: list[int] = []

    def forward(self, sample, timestep, context, *args):
        self.contexts.append(context.shape[1])
        return super().forward(sample, timestep, context, *args)


@pytest.fixture
def own_stages(tiny_model_dir):
    """An orchestrator over stages of this test's own (concurrent traffic never goes to the session's), the base
    UNet recorded: (stub, base servicer, recorder)."""
    unet, scheduler_config = denoiser.load_denoiser(tiny_model_dir / "base")
    recorder = ContextRecorder(unet)
    base = denoiser.DenoiserServicer(recorder, scheduler_config)
    servers = [text_encoder.build(tiny_model_dir / "base"), denoiser.make_server(base), vae.build(tiny_model_dir / "base")]
    te, den, va = (f"127.0.0.1:{s.port}" for s in servers)
    servers.append(orchestrator.build(te, den, None, va))
    yield orchestrator_pb2_grpc.OrchestratorStub(grpc.insecure_channel(f"127.0.0.1:{servers[-1].port}")), base, recorder
    for server in reversed(servers):
        server.stop(0)


def test_concurrent_requests_of_different_context_lengths_never_share_a_forward_and_each_equals_its_solo_run(
        own_stages):
    stub, base, recorder = own_stages
    requests = {"plain": _params(seed=5), "compel": _params(prompt=[LONG], negative_prompt=["blurry"],
                                                            prompt_syntax="compel", seed=6)}
    solo = {name: _generate(stub, params)[1][0] for name, params in requests.items()}
    recorder.rows.clear()
    recorder.contexts.clear()
    recorder.entered.clear()
    recorder.gate.clear()
    results = {}

    def run(name):
        results[name] = _generate(stub, requests[name])[1][0]

    first = threading.Thread(target=run, args=("plain",))
    first.start()
    assert recorder.entered.wait(WAIT_S)  # the base's worker holds the plain request's first forward
    second = threading.Thread(target=run, args=("compel",))
    second.start()
    deadline = time.monotonic() + WAIT_S
    while base.engine.held() < 2:  # the compel request waits at the base beside it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    recorder.gate.set()
    first.join(WAIT_S)
    second.join(WAIT_S)
    for name, image in solo.items():
        np.testing.assert_array_equal(results[name], image)
    assert sorted(set(recorder.contexts)) == [77, 3 * 77]
    assert recorder.rows == [2] * 8  # 4 steps each, one request's guided pair per forward


_BLOCKING_VAE = """
import sys, time, grpc
from concurrent import futures
def decode(requests, context):
    for _ in requests:
        pass
    time.sleep(60)
    yield b""
handler = grpc.method_handlers_generic_handler("sdxl.v1.Vae", {"Decode": grpc.stream_stream_rpc_method_handler(decode)})
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((handler,))
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
time.sleep(120)
"""


def test_a_stream_whose_stage_is_killed_fails_unavailable_at_once():
    # grpcio 1.85 blocks a stream with a retryPolicy past its deadline when the peer dies before answering
    # (round_robin or pick_first); stage_channel's streams have none, and fail as soon as the socket closes.
    import os
    import signal
    import subprocess
    import sys

    config = channels.SERVICE_CONFIG
    streaming = {"sdxl.v1.TextEncoder", "sdxl.v1.Denoiser", "sdxl.v1.Vae"}
    assert not any(streaming & {n["service"] for n in m["name"]} for m in config["methodConfig"] if "retryPolicy" in m)
    stage = subprocess.Popen([sys.executable, "-c", _BLOCKING_VAE], stdout=subprocess.PIPE, text=True)
    try:
        port = int(stage.stdout.readline())
        channel = channels.stage_channel(f"127.0.0.1:{port},127.0.0.1:{port}", 1 << 20)
        grpc.channel_ready_future(channel).result(timeout=10)
        call = channel.stream_stream("/sdxl.v1.Vae/Decode")(iter([b""]), timeout=20)
        time.sleep(0.5)  # the request is in, the stage is "decoding"
        os.kill(stage.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            list(call)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - killed < 2.0
        channel.close()
    finally:
        stage.kill()
        stage.wait()
