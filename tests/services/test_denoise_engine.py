"""The denoiser's engine: calls advance together step by step, each equal to its solo run."""

import math
import threading
import time

import grpc
import pytest
import torch

from sdxl.v1 import denoiser_pb2, stage_pb2
from sdxl_core.pipelines import SDXLPipeline
from sdxl_services import denoiser
from sdxl_services.budget import RowBudget, calibrate
from tests.services.test_denoiser import PROMPT, SEED, denoise, embeddings

WAIT_S = 60


@pytest.fixture(scope="module")
def pipes(tiny_model_dir):
    """The pipeline whose text encoders stand in for the text-encoder stage."""
    return {"base": SDXLPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)}


class Recorder(torch.nn.Module):
    """The UNet, recording each forward's row count; closed `gate` holds the engine's worker in its forward."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config = unet, unet.config
        self.rows: list[int] = []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, sample, *args):
        self.entered.set()
        assert self.gate.wait(WAIT_S)
        self.rows.append(sample.shape[0])
        return self.unet(sample, *args)


@pytest.fixture
def engine_server(tiny_model_dir):
    """A base server whose engine packs up to 16 rows, and its recorder; `policy` as the param says."""
    started = []

    def start(policy="batch", max_batch_rows=16):
        unet, scheduler_config = denoiser.load_denoiser(tiny_model_dir / "base")
        recorder = Recorder(unet)
        servicer = denoiser.DenoiserServicer(recorder, scheduler_config, policy=policy, max_batch_rows=max_batch_rows)
        server = denoiser.make_server(servicer)
        started.append(server)
        return server, servicer, recorder

    yield start
    for server in started:
        server.stop(0)


def header(**fields) -> denoiser_pb2.DenoiseHeader:
    return denoiser_pb2.DenoiseHeader(**({"num_inference_steps": 4, "guidance_scale": 5.0, "seed": SEED,
                                         "height": 64, "width": 64} | fields))


class Calls:
    """Denoise calls in threads, started while the engine's worker is held, so that they share its iterations."""

    def __init__(self, server, servicer, recorder):
        self.server, self.servicer, self.recorder = server, servicer, recorder
        self.results, self.errors, self.threads = {}, {}, []

    def start(self, name, h, tensors, **options):
        def call():
            try:
                self.results[name] = denoise(self.server, h, tensors, **options)[0]
            except grpc.RpcError as error:
                self.errors[name] = error.code()

        held = self.servicer.engine.held()
        thread = threading.Thread(target=call)
        thread.start()
        self.threads.append(thread)
        deadline = time.monotonic() + WAIT_S
        while self.servicer.engine.held() <= held and thread.is_alive():  # submitted before the next one starts
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return thread

    def join(self):
        for thread in self.threads:
            thread.join(WAIT_S)


def solo(server, h, tensors):
    return denoise(server, h, tensors)[0]


def test_concurrent_calls_share_unet_forwards_and_each_equals_its_solo_run(engine_server, pipes):
    server, servicer, recorder = engine_server()
    tensors = embeddings(pipes["base"])
    first, second = header(num_inference_steps=4), header(num_inference_steps=6, seed=SEED + 1)
    recorder.gate.clear()
    calls = Calls(server, servicer, recorder)
    calls.start("first", first, tensors)
    assert recorder.entered.wait(WAIT_S)  # the worker holds the first call's first forward
    calls.start("second", second, tensors)
    recorder.gate.set()
    calls.join()
    # The first call's first step ran alone; its other 3 steps shared forwards with the second call's first 3.
    assert recorder.rows == [2, 4, 4, 4, 2, 2, 2]
    recorder.rows.clear()
    for name, h in (("first", first), ("second", second)):
        alone = solo(server, h, tensors)
        assert (calls.results[name] - alone).abs().max() <= 1e-4, name
    assert recorder.rows == [2] * 10  # alone: one forward per step


def test_different_schedulers_steps_sizes_guidance_and_inpainting_each_equal_their_solo_run(engine_server, pipes):
    server, servicer, recorder = engine_server(max_batch_rows=64)
    guided, unguided = embeddings(pipes["base"]), embeddings(pipes["base"], guided=False)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1
    image_latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cases = {
        "euler": (header(), guided),
        "dpmpp_2m, 7 steps": (header(scheduler="dpmpp_2m", num_inference_steps=7, seed=2), guided),
        "heun (second order)": (header(scheduler="heun", num_inference_steps=3, seed=3), guided),
        "euler_a, 32 px": (header(scheduler="euler_a", height=32, width=32, seed=4), guided),
        "no guidance": (header(guidance_scale=1.0, seed=5), unguided),
        "img2img": (header(strength=0.6, seed=6), guided | {"image_latents": image_latents}),
        "inpaint": (header(seed=7, scheduler="dpmpp_2m"), guided | {"image_latents": image_latents, "mask": mask}),
    }
    recorder.gate.clear()
    calls = Calls(server, servicer, recorder)
    for name, (h, tensors) in cases.items():
        calls.start(name, h, tensors)
        assert recorder.entered.wait(WAIT_S)
    recorder.gate.set()
    calls.join()
    assert not calls.errors
    shared = len(recorder.rows)
    steps = sum(len(solo_progress) for solo_progress in [denoise(server, h, t)[1] for h, t in cases.values()])
    assert shared < steps - 5  # most steps shared forwards; 32 px latents only ever with each other
    for name, (h, tensors) in cases.items():
        assert (calls.results[name] - solo(server, h, tensors)).abs().max() <= 1e-4, name


def test_cancelling_or_timing_out_one_call_leaves_the_others_unchanged(engine_server, pipes):
    server, servicer, recorder = engine_server()
    tensors = embeddings(pipes["base"])
    kept = header(num_inference_steps=8)
    recorder.gate.clear()
    calls = Calls(server, servicer, recorder)
    calls.start("kept", kept, tensors)
    assert recorder.entered.wait(WAIT_S)
    calls.start("timed out", header(num_inference_steps=1000, seed=9), tensors, timeout=1.0)
    recorder.gate.set()
    calls.join()
    assert calls.errors == {"timed out": grpc.StatusCode.DEADLINE_EXCEEDED}
    assert (calls.results["kept"] - solo(server, kept, tensors)).abs().max() <= 1e-4


def served_order(servicer) -> list[int]:
    """The seq of the job each of the engine's iterations advanced first, as they happen."""
    order, original = [], servicer.engine.iterate

    def iterate(jobs):
        original(jobs)
        order.append(next(job.seq for job in jobs if job.served == servicer.engine.iteration))

    servicer.engine.iterate = iterate
    return order


def test_an_interactive_call_goes_before_a_batch_one(engine_server, pipes):
    server, servicer, recorder = engine_server(max_batch_rows=2)  # one guided image per forward
    tensors = embeddings(pipes["base"])
    order = served_order(servicer)
    recorder.gate.clear()
    calls = Calls(server, servicer, recorder)
    calls.start("batch", header(num_inference_steps=6, priority=stage_pb2.PRIORITY_BATCH), tensors)
    assert recorder.entered.wait(WAIT_S)
    calls.start("interactive", header(num_inference_steps=3, priority=stage_pb2.PRIORITY_INTERACTIVE,
                                      seed=SEED + 1), tensors)
    recorder.gate.set()
    calls.join()
    batch = order[0]
    assert ["batch" if seq == batch else "interactive" for seq in order] == ["batch"] + ["interactive"] * 3 + \
        ["batch"] * 5
    assert set(calls.results) == {"batch", "interactive"}


def test_calls_of_equal_priority_take_turns_when_the_budget_holds_one(engine_server, pipes):
    server, servicer, recorder = engine_server(max_batch_rows=2)
    tensors = embeddings(pipes["base"])
    order = served_order(servicer)
    recorder.gate.clear()
    calls = Calls(server, servicer, recorder)
    calls.start("long", header(num_inference_steps=8), tensors)
    assert recorder.entered.wait(WAIT_S)
    calls.start("short", header(num_inference_steps=3, seed=SEED + 1), tensors)
    recorder.gate.set()
    calls.join()
    long = order[0]
    assert ["long" if seq == long else "short" for seq in order] == ["long", "short"] * 3 + ["long"] * 5


def test_fifo_runs_one_call_to_its_end_before_the_next(engine_server, pipes):
    server, servicer, recorder = engine_server(policy="fifo")
    tensors = embeddings(pipes["base"])
    recorder.gate.clear()
    calls = Calls(server, servicer, recorder)
    calls.start("first", header(num_inference_steps=4), tensors)
    assert recorder.entered.wait(WAIT_S)
    second = header(num_inference_steps=4, seed=SEED + 1)
    calls.start("second", second, tensors)
    recorder.gate.set()
    calls.join()
    assert recorder.rows == [2] * 8
    assert torch.equal(calls.results["second"], solo(server, second, tensors))  # never shared a forward: exact


def test_calibrate_keeps_doubling_while_a_row_gets_cheaper_and_stops_where_it_costs_more():
    seconds = {2: 1.0, 4: 1.2, 8: 1.6, 16: 4.0, 32: 8.0}  # per row: 0.5, 0.3, 0.2, 0.25, ...
    rows, curve = calibrate(lambda r: seconds[r], first=2, limit=32)
    assert rows == 8 and set(curve) == {2, 4, 8, 16}
    flat = {2: 1.0, 4: 2.2}  # batching costs more per row (a busy CPU): never batch
    assert calibrate(lambda r: flat[r], first=2, limit=32)[0] == 2
    out_of_memory = {2: 1.0, 4: 1.2, 8: math.inf}
    assert calibrate(lambda r: out_of_memory[r], first=2, limit=32) == (4, {2: 0.5, 4: 0.3, 8: math.inf})


def test_the_row_budget_is_measured_once_per_key_unless_fixed():
    measured = []
    budget = RowBudget()
    for _ in range(3):
        assert budget.rows((8, 8, 77), lambda: measured.append(1) or (4, {2: 0.5, 4: 0.3})) == 4
    assert measured == [1]
    assert RowBudget(fixed=6).rows((8, 8, 77), lambda: pytest.fail("a fixed budget measures nothing")) == 6


def test_a_request_the_base_would_refuse_costs_no_text_encoder_time(engine_server, pipes, tiny_model_dir):
    from prometheus_client import REGISTRY

    from sdxl.v1 import orchestrator_pb2, orchestrator_pb2_grpc
    from sdxl_services import orchestrator, text_encoder, vae
    from sdxl_services.server import ServerOptions

    server, servicer, recorder = engine_server()
    full = denoiser.make_server(servicer, options=ServerOptions(max_concurrency=1, max_queue=0))
    others = [text_encoder.build(tiny_model_dir / "base"), vae.build(tiny_model_dir / "base")]
    front = orchestrator.build(*(f"127.0.0.1:{s.port}" for s in (others[0], full)), None, f"127.0.0.1:{others[1].port}")
    encoded = {"stage": "text_encoder", "method": "/sdxl.v1.TextEncoder/EncodePrompt", "code": "OK"}
    try:
        recorder.gate.clear()
        busy = Calls(full, servicer, recorder)
        busy.start("holding the only place", header(), embeddings(pipes["base"]))
        assert recorder.entered.wait(WAIT_S)
        before = REGISTRY.get_sample_value("sdxl_requests_total", encoded) or 0
        stub = orchestrator_pb2_grpc.OrchestratorStub(grpc.insecure_channel(f"127.0.0.1:{front.port}"))
        params = orchestrator_pb2.GenerateParams(prompt=[PROMPT], height=64, width=64, num_inference_steps=2)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(iter([orchestrator_pb2.GenerateRequest(params=params)]), timeout=WAIT_S))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "base stage" in error.value.details()
        assert (REGISTRY.get_sample_value("sdxl_requests_total", encoded) or 0) == before
        recorder.gate.set()
        busy.join()
        assert list(stub.Generate(iter([orchestrator_pb2.GenerateRequest(params=params)]), timeout=WAIT_S))
        assert REGISTRY.get_sample_value("sdxl_requests_total", encoded) == before + 1
    finally:
        recorder.gate.set()
        for stopped in (front, full, *others):
            stopped.stop(0)
