"""LoRA adapters served: a stage's --lora-dir, per-request adapters on the denoiser's rows, equal to in-process."""

import os
import re
import shutil
import threading

import grpc
import numpy as np
import pytest
import torch

from sdxl.v1 import stage_pb2, stage_pb2_grpc
from sdxl_core.pipelines import SDXLImg2ImgPipeline, SDXLPipeline
from sdxl_services import denoiser
from sdxl_services.loras import LoraLibrary, adapter_key
from tests.services.engines import WAIT_S, wait_for
from tests.services.test_denoiser import PROMPT, SEED, denoise, embeddings

TOL = 1e-4


def adapters(**weights) -> list[stage_pb2.LoraAdapter]:
    return [stage_pb2.LoraAdapter(name=name, weight=weight) for name, weight in weights.items()]


def header(**fields):
    from tests.services.test_denoise_engine import header as engine_header

    return engine_header(**fields)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir, lora_files):
    pipe = SDXLPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)
    for name in ("style", "detail"):
        pipe.load_lora_weights(lora_files[name], adapter_name=name)
    pipe.disable_lora()  # calls name their adapters with loras=
    return pipe


@pytest.fixture
def lora_dir(lora_files, tmp_path):
    """A copy of the LoRA folder this test may change."""
    folder = tmp_path / "loras"
    shutil.copytree(lora_files["style"].parent, folder)
    return folder


class Gate:
    """Holds the UNet's forwards while closed and records each forward's rows (a pre-hook on the real UNet, so
    that the adapters' hooks find their layers)."""

    def __init__(self, unet):
        self.rows, self.open, self.entered = [], threading.Event(), threading.Event()
        self.open.set()
        unet.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.entered.set()
        assert self.open.wait(WAIT_S)
        self.rows.append(args[0].shape[0])


@pytest.fixture
def base(tiny_model_dir, lora_dir):
    unet, scheduler_config = denoiser.load_denoiser(tiny_model_dir / "base")
    gate = Gate(unet)
    servicer = denoiser.DenoiserServicer(unet, scheduler_config, max_batch_rows=16, lora_dir=lora_dir)
    server = denoiser.make_server(servicer)
    yield server, servicer, gate
    server.stop(0)


def test_denoise_with_adapters_equals_the_pipeline(base, pipe):
    server, _, _ = base
    for loras in ({"detail": 0.8}, {"style": 1.0, "detail": -0.5}):
        with pipe.lora_context(loras, None):  # style adapts the text encoders too, as the text-encoder stage would
            tensors = embeddings(pipe)
        latents, _ = denoise(server, header(loras=adapters(**loras)), tensors)
        expected = pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, seed=SEED, height=64, width=64,
                        output_type="latent", loras=loras).images
        assert (latents - expected).abs().max() <= TOL, loras
    tensors = embeddings(pipe)
    plain, _ = denoise(server, header(), tensors)
    adapted, _ = denoise(server, header(loras=adapters(detail=1.0)), tensors)
    assert (plain - adapted).abs().max() > 100 * TOL
    zero, _ = denoise(server, header(loras=adapters(detail=0.0)), tensors)
    assert torch.equal(zero, plain)


def test_concurrent_calls_with_different_adapters_share_forwards_and_each_equal_their_solo_run(base, pipe):
    server, servicer, gate = base
    tensors = embeddings(pipe)
    calls = {"style": header(loras=adapters(style=1.0)), "none": header(seed=SEED + 1),
             "detail": header(loras=adapters(detail=1.5), seed=SEED + 2)}
    solo = {name: denoise(server, h, tensors)[0] for name, h in calls.items()}
    gate.rows.clear()
    gate.open.clear()
    wait_for(lambda: servicer.engine.held() == 0)  # the solo runs' jobs dropped
    results, threads = {}, []
    for held, (name, h) in enumerate(calls.items()):
        threads.append(threading.Thread(target=lambda n=name, h=h: results.update({n: denoise(server, h, tensors)[0]})))
        threads[-1].start()
        wait_for(lambda held=held: servicer.engine.held() > held)  # submitted before the next one starts
    gate.open.set()
    for thread in threads:
        thread.join(WAIT_S)
    assert max(gate.rows) == 6  # the three calls' rows in one forward
    for name in calls:
        assert (results[name] - solo[name]).abs().max() <= TOL, name


def test_unknown_adapters_are_invalid_before_any_work(base, pipe, tiny_model_dir):
    server, _, gate = base
    tensors = embeddings(pipe)
    gate.rows.clear()
    for loras, message in ((adapters(nope=1.0), "unknown LoRA adapter 'nope'.*'detail'"),
                           (adapters(**{"../style": 1.0}), "is not a file name"),
                           (adapters(style=float("nan")), "must be finite")):
        with pytest.raises(grpc.RpcError) as error:
            denoise(server, header(loras=loras), tensors)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert gate.rows == []  # no forward ran
        assert re.search(message, error.value.details()), error.value.details()
    without = denoiser.make_server(denoiser.DenoiserServicer(*denoiser.load_denoiser(tiny_model_dir / "base")))
    try:
        with pytest.raises(grpc.RpcError, match="--lora-dir") as error:
            denoise(without, header(loras=adapters(style=1.0)), tensors)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        without.stop(0)


def test_describe_names_the_adapters_and_new_files_serve_without_a_restart(base, pipe, lora_dir, lora_files):
    server, _, _ = base
    stub = stage_pb2_grpc.StageInfoStub(grpc.insecure_channel(f"localhost:{server.port}"))
    assert list(stub.Describe(stage_pb2.DescribeRequest()).loras) == ["detail", "style", "text"]
    shutil.copy(lora_files["detail"], lora_dir / "detail_copy.safetensors")
    assert "detail_copy" in stub.Describe(stage_pb2.DescribeRequest()).loras
    tensors = embeddings(pipe)
    copy, _ = denoise(server, header(loras=adapters(detail_copy=1.0)), tensors)
    original, _ = denoise(server, header(loras=adapters(detail=1.0)), tensors)
    assert torch.equal(copy, original)


def test_the_library_loads_once_keeps_a_bounded_cache_and_reloads_a_changed_file(lora_dir, pipe, monkeypatch):
    import sdxl_services.loras as loras_module

    loads = []
    real = loras_module.load_adapter
    monkeypatch.setattr(loras_module, "load_adapter", lambda path, *a, **k: loads.append(path.stem) or real(path, *a, **k))
    library = LoraLibrary(lora_dir, {"unet": pipe.unet}, cache_size=1)
    first = library.resolve(adapter_key(adapters(detail=1.0)))
    assert library.resolve(adapter_key(adapters(detail=2.0))).keys() == first.keys()  # loaded once
    library.resolve(adapter_key(adapters(style=1.0)))  # detail out of the one-adapter cache
    library.resolve(adapter_key(adapters(detail=1.0)))
    assert loads == ["detail", "style", "detail"]
    stat = (lora_dir / "detail.safetensors").stat()
    os.utime(lora_dir / "detail.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    library.resolve(adapter_key(adapters(detail=1.0)))
    assert loads[-1] == "detail" and len(loads) == 4
    with pytest.raises(ValueError, match="named more than once"):
        adapter_key(adapters(detail=1.0) + adapters(detail=2.0))
    assert adapter_key([stage_pb2.LoraAdapter(name="detail")]) == (("detail", 1.0),)  # weight unset: 1


# --- through the orchestrator


@pytest.fixture(scope="module")
def cluster(lora_orchestrator):
    return lora_orchestrator


def test_generate_with_adapters_equals_the_pipelines(cluster, tiny_model_dir):
    from sdxl_client import SDXLClient

    address, folder = cluster
    base = SDXLPipeline.from_pretrained(tiny_model_dir / "base")
    refiner = SDXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "refiner")
    base.load_lora_weights(folder / "style.safetensors", adapter_name="style")
    base.load_lora_weights(folder / "text.safetensors", adapter_name="text")
    refiner.load_lora_weights(folder / "refined.safetensors", adapter_name="refined")
    call = dict(height=64, width=64, num_inference_steps=5, seed=SEED)
    with SDXLClient(address) as client:
        got = client.generate(PROMPT, loras={"style": 0.7, "text": 1.2}, **call).images
        ensemble = client.generate(PROMPT, loras={"style": 0.7}, refiner="ensemble", refiner_loras={"refined": 0.9},
                                   **call).images
        with pytest.raises(grpc.RpcError) as error:
            client.generate(PROMPT, loras={"nope": 1.0}, **call)
    want = base(PROMPT, loras={"style": 0.7, "text": 1.2}, **call).images
    np.testing.assert_array_equal(np.array(got[0]), np.array(want[0]))
    latents = base(PROMPT, loras={"style": 0.7}, denoising_end=0.8, output_type="latent", **call).images
    want = refiner(PROMPT, image=latents, denoising_start=0.8, loras={"refined": 0.9},
                   **{k: v for k, v in call.items() if k not in ("height", "width")}).images
    np.testing.assert_array_equal(np.array(ensemble[0]), np.array(want[0]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("text_encoder stage: unknown LoRA adapter 'nope'")  # the first stage


def test_concurrent_generates_with_different_adapters_each_equal_their_solo_run(cluster):
    from sdxl_client import SDXLClient

    address, _ = cluster
    calls = {"papercut": {"loras": {"papercut": 0.8}}, "none": {}, "pixel": {"loras": {"pixel-art": 1.2}, "seed": 7}}
    common = dict(height=64, width=64, num_inference_steps=6, seed=SEED)
    with SDXLClient(address) as client:
        solo = {name: np.array(client.generate(PROMPT, **(common | kwargs)).images[0]) for name, kwargs in calls.items()}
        together, barrier = {}, threading.Barrier(len(calls))

        def one(name):
            barrier.wait()
            together[name] = np.array(client.generate(PROMPT, **(common | calls[name])).images[0])

        threads = [threading.Thread(target=one, args=(name,)) for name in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
    for name in calls:  # a shared forward differs from a solo one by float noise (< 1e-4 in the latents)
        assert np.abs(together[name].astype(int) - solo[name].astype(int)).max() <= 1, name
    assert np.abs(solo["papercut"].astype(int) - solo["none"].astype(int)).max() > 10


def test_the_text_encoder_joins_only_calls_with_the_same_adapters(tiny_model_dir, lora_dir, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from sdxl.v1 import text_encoder_pb2, text_encoder_pb2_grpc
    from sdxl_services import text_encoder
    from tests.services import test_text_encoder_engine as engine

    servicer = text_encoder.load_servicer(tiny_model_dir / "base", lora_dir=lora_dir)
    server = text_encoder.make_server(servicer, "127.0.0.1:0")
    try:
        stub = text_encoder_pb2_grpc.TextEncoderStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        R, base = text_encoder_pb2.EncodePromptRequest, text_encoder_pb2.TARGET_BASE
        first = R(prompt=["first"], targets=[base])  # unguided: another key, held at the gate
        requests = [R(prompt=["a cat"], targets=[base], guided=True, loras=adapters(text=1.0)),
                    R(prompt=["a dog"], targets=[base], guided=True),
                    R(prompt=["a bird"], targets=[base], guided=True, loras=adapters(text=1.0)),
                    R(prompt=["a fox"], targets=[base], guided=True, loras=adapters(text=0.5))]
        solo = [engine.encode(stub, r) for r in requests]
        gate = engine.Gate(engine.bigg(servicer), monkeypatch)
        with ThreadPoolExecutor(len(requests) + 1) as pool:
            head, futures, _ = engine.overlapped(stub, servicer.engine, gate, monkeypatch, first, requests, pool)
            head.result(engine.WAIT_S)
            for future, want in zip(futures, solo):
                engine.assert_close(future.result(engine.WAIT_S), want)
        # bigG's forwards (no negative prompt: zeros, one pass each): first alone; the two calls with text at 1.0
        # together; the one without adapters; the one with text at 0.5
        assert gate.rows == [1, 2, 1, 1]
        plain = engine.encode(stub, R(prompt=["a cat"], targets=[base], guided=True))
        assert (plain["base/prompt_embeds"] - solo[0]["base/prompt_embeds"]).abs().max() > 1e-3
    finally:
        server.stop(0)
