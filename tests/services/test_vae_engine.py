"""The VAE's engine: concurrent Decode calls of one latent size share one decode, up to the row budget (fixed, or
measured as the denoiser's); Encode runs alone; the model runs on the engine's worker only, the watermark and
PNG encoding on the calls' own threads; a cancelled call leaves the others as they were."""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import PIL.Image
import pytest
import torch

from sdxl.v1 import tensor_pb2, vae_pb2, vae_pb2_grpc
from sdxl_core.latents import postprocess
from sdxl_core.vae import latents_to_images
from sdxl_core.watermark import watermark_available
from sdxl_services import vae
from sdxl_services.budget import RowBudget
from sdxl_services.engine import Job
from sdxl_services.stage import load, parse_args, server_options
from sdxl_wire.images import to_png
from sdxl_wire.tensors import to_proto_chunks
from tests.services.engines import later, recording, wait_for
from tests.wire.streams import assemble

WAIT_S = 60
ENGINE_THREAD = "sdxl-vae-engine"
# A decode over more images runs the convolutions in another order: measured up to 1.4e-6 in [0, 1] on CPU fp32,
# which moves a few uint8 pixels in a million by one.
ATOL = 1e-4


def latents(batch: int, side: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(seed))


class Gate:
    """Wraps a module's method: counts calls, their rows and threads; the first call waits until `opened`."""

    def __init__(self, module, name: str, monkeypatch, opened: bool = False):
        self.rows, self.threads = [], set()
        self.entered, self.opened = threading.Event(), threading.Event()
        if opened:
            self.opened.set()
        method = getattr(module, name)

        def gated(x, *args, **kwargs):
            self.rows.append(x.shape[0])
            self.threads.add(threading.current_thread().name)
            self.entered.set()
            assert self.opened.wait(WAIT_S)
            return method(x, *args, **kwargs)

        monkeypatch.setattr(module, name, gated)


class Threads:
    """Wraps a function of sdxl_services.vae: the threads that called it."""

    def __init__(self, name: str, monkeypatch):
        self.names = set()
        function = getattr(vae, name)

        def recorded(*args, **kwargs):
            self.names.add(threading.current_thread().name)
            return function(*args, **kwargs)

        monkeypatch.setattr(vae, name, recorded)


@pytest.fixture(scope="module")
def servicer(tiny_model_dir):
    servicer = vae.load_servicer(tiny_model_dir / "base", max_batch_rows=8)
    yield servicer
    servicer.close()


@pytest.fixture(scope="module")
def stub(servicer):
    server = vae.make_server(servicer, "127.0.0.1:0")
    yield vae_pb2_grpc.VaeStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    server.stop(0)


def decode_call(stub, x, timeout: float = WAIT_S, **header):
    messages = [vae_pb2.DecodeRequest(header=vae_pb2.DecodeHeader(**header))]
    messages += [vae_pb2.DecodeRequest(chunks=[c]) for c in to_proto_chunks("latents", x)]
    return stub.Decode(iter(messages), timeout=timeout)


def pixels(responses) -> np.ndarray:
    """(B, H, W, 3) uint8 from a Decode's RAW tensor or its PNGs."""
    responses = list(responses)
    if responses[0].WhichOneof("payload") == "chunk":
        return assemble(r.chunk for r in responses)["images"].numpy()
    by_index: dict[int, bytearray] = {}
    for r in responses:
        by_index.setdefault(r.image.index, bytearray()).extend(r.image.data)
    return np.stack([np.asarray(PIL.Image.open(io.BytesIO(bytes(by_index[i])))) for i in sorted(by_index)])


def decoded(stub, x, timeout: float = WAIT_S, **header) -> np.ndarray:
    return pixels(decode_call(stub, x, timeout, **header))


def encoded(stub, image: bytes, seed: int, timeout: float = WAIT_S) -> dict:
    piece = tensor_pb2.ImageChunk(index=0, total_bytes=len(image), offset=0, data=image)
    messages = [vae_pb2.EncodeRequest(header=vae_pb2.EncodeHeader(seed=seed)), vae_pb2.EncodeRequest(image=piece)]
    return assemble(c for r in stub.Encode(iter(messages), timeout=timeout) for c in r.chunks)


IMAGE = to_png(PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)))
RAW = dict(output_format=vae_pb2.OUTPUT_FORMAT_RAW, watermark=False)


@pytest.mark.skipif(not watermark_available(), reason="invisible-watermark is not installed")
def test_concurrent_decodes_of_one_size_share_a_decode_on_the_worker_and_watermark_on_their_own_threads(
        servicer, stub, monkeypatch):
    calls = {  # in the order they reach the engine while the worker decodes `first`
        "two": (latents(2, 8, 1), RAW),
        "encode": None,
        "png": (latents(1, 8, 2), dict(watermark=False)),
        "marked": (latents(1, 32, 3), dict(output_format=vae_pb2.OUTPUT_FORMAT_RAW)),  # 256 px: watermarked
        "cancelled": (latents(3, 8, 4), RAW),
        "one": (latents(1, 8, 5), RAW),
    }

    def run(call, timeout=WAIT_S):
        return encoded(stub, IMAGE, 7, timeout) if call is None else decoded(stub, call[0], timeout, **call[1])

    solo = {name: run(call) for name, call in calls.items()}
    decode, encode = Gate(servicer.vae, "decode", monkeypatch), Gate(servicer.vae.quant_conv, "forward", monkeypatch, True)  # encode's last piece
    watermark, png = Threads("apply_watermark", monkeypatch), Threads("to_png", monkeypatch)
    jobs = recording(monkeypatch, servicer.engine)
    with ThreadPoolExecutor(len(calls)) as pool:
        first = pool.submit(decoded, stub, latents(1, 8, 0), **RAW)
        assert decode.entered.wait(WAIT_S)
        futures = {}
        for submitted, (name, call) in enumerate(calls.items(), start=2):
            if name == "cancelled":
                cancelled, cancelled_job = decode_call(stub, call[0], later(submitted), **call[1]), submitted - 1
            else:
                futures[name] = pool.submit(run, call, later(submitted))
            wait_for(lambda n=submitted: len(jobs) == n)  # each reaches the engine before the next: a fixed order
        with pytest.raises(grpc.RpcError) as error:  # checked on the call's thread, while the worker is busy
            decoded(stub, torch.zeros(1, 3, 8, 8), **RAW)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "latents" in error.value.details()
        cancelled.cancel()
        assert jobs[cancelled_job].ended.wait(WAIT_S)  # seen by the server before the worker takes the job
        decode.opened.set()
        first.result(WAIT_S)
        got = {name: future.result(WAIT_S) for name, future in futures.items()}
    with pytest.raises(grpc.RpcError) as error:
        list(cancelled)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    # first; "two", "png" and "one" together (the cancelled 3 dropped); the encode alone; the 256 px one alone
    assert decode.rows == [1, 4, 1] and encode.rows == [1]  # alone: 5 decodes
    assert decode.threads == encode.threads == {ENGINE_THREAD}
    assert watermark.names and png.names and ENGINE_THREAD not in watermark.names | png.names
    assert sorted(got["encode"]) == sorted(solo["encode"])  # served alone, so exactly as alone
    assert all(torch.equal(got["encode"][name], t) for name, t in solo["encode"].items())
    assert np.array_equal(got["marked"], solo["marked"])
    for name in ("two", "png", "one"):
        assert got[name].shape == solo[name].shape
        assert np.abs(got[name].astype(int) - solo[name]).max() <= 1, name


def gated_engine(servicer, monkeypatch, policy="batch", budget=None):
    engine = vae.VaeEngine(servicer.vae, policy, budget or RowBudget(8, limit=vae.MAX_IMAGES))
    return engine, Gate(servicer.vae, "decode", monkeypatch)


def run_overlapped(engine, gate, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Decode xs[0] until it is inside the gated decode, submit the others, open the gate: each one's pixels."""
    jobs = [engine.submit(Job(vae.DecodeWork(xs[0])))]
    assert gate.entered.wait(WAIT_S)
    jobs += [engine.submit(Job(vae.DecodeWork(x))) for x in xs[1:]]
    gate.opened.set()
    return [vae.result(engine, job) for job in jobs]


BATCH = [latents(1, 8, 0), latents(2, 8, 1), latents(1, 8, 2), latents(3, 8, 3)]


def assert_solo_within_tolerance(vae_model, xs, got) -> None:
    for x, images in zip(xs, got):
        want = latents_to_images(vae_model, x)
        torch.testing.assert_close(postprocess(images, "pt"), postprocess(want, "pt"), rtol=0, atol=ATOL)


@pytest.mark.parametrize("policy, max_rows, rows", [
    ("batch", 8, [1, 6]),
    ("batch", 3, [1, 3, 3]),  # 2 + 1 images fill 3 rows; the 3 of the last call decode next
    ("fifo", 8, [1, 2, 1, 3]),
])
def test_batched_decodes_equal_solo_decodes_within_1e_4_and_keep_to_the_policy_and_budget(
        servicer, monkeypatch, policy, max_rows, rows):
    engine, gate = gated_engine(servicer, monkeypatch, policy, RowBudget(max_rows, limit=vae.MAX_IMAGES))
    try:
        got = run_overlapped(engine, gate, BATCH)
    finally:
        engine.stop()
    assert gate.rows == rows
    assert_solo_within_tolerance(servicer.vae, BATCH, got)


def test_without_max_batch_rows_the_budget_is_measured_once_per_latent_size(servicer, monkeypatch):
    budget = RowBudget(limit=8)
    engine, gate = gated_engine(servicer, monkeypatch, budget=budget)
    try:
        got = run_overlapped(engine, gate, BATCH)
    finally:
        engine.stop()
    assert list(budget.curves) == [(8, 8, torch.float32)]
    chosen = budget.rows((8, 8, torch.float32), lambda: pytest.fail("measured twice"))
    assert chosen in budget.curves[(8, 8, torch.float32)]
    assert_solo_within_tolerance(servicer.vae, BATCH, got)


def test_the_stage_serves_many_calls_at_once_with_the_policy_and_row_bound_it_is_given(tiny_model_dir):
    args = parse_args(["vae", "--model", str(tiny_model_dir / "base"), "--policy", "fifo", "--max-batch-rows", "3"])
    options = server_options(args)
    assert (options.max_concurrency, options.max_queue) == (64, 64)
    servicer = load(args)
    try:
        assert servicer.engine.policy == "fifo" and servicer.engine.budget.fixed == 3
    finally:
        servicer.close()


def test_a_small_decode_runs_between_the_pieces_of_a_large_one_which_stays_exact(servicer, stub, monkeypatch):
    order, first_piece, release = [], threading.Event(), threading.Event()

    class Held(vae.Decoding):
        def advance(self):
            order.append("large")
            if len(order) == 1:
                first_piece.set()
                assert release.wait(WAIT_S)
            super().advance()

    whole = vae.latents_to_images
    monkeypatch.setattr(vae, "Decoding", Held)
    monkeypatch.setattr(vae, "latents_to_images", lambda *a: order.append("small") or whole(*a))
    large, small = latents(1, 80, 9), latents(1, 8, 10)  # 640 px: a piece at a time; 64 px: whole
    with ThreadPoolExecutor(2) as pool:
        got_large = pool.submit(decoded, stub, large, later(0), **RAW)
        assert first_piece.wait(WAIT_S)
        got_small = pool.submit(decoded, stub, small, later(1), **RAW)
        wait_for(lambda: servicer.engine.held() == 2)
        release.set()
        large_pixels, small_pixels = got_large.result(), got_small.result()
    assert order[:3] == ["large", "small", "large"] and order.count("large") > 5
    expected = postprocess(whole(servicer.vae, large), "np")
    assert np.array_equal(large_pixels, (expected * 255).round().astype(np.uint8))
    assert np.array_equal(small_pixels, (postprocess(whole(servicer.vae, small), "np") * 255).round().astype(np.uint8))


def test_a_tiled_stage_decodes_tile_by_tile_as_the_core_does(tiny_model_dir):
    from sdxl_core.decoding import Decoding

    tiled = vae.load_servicer(tiny_model_dir / "base", tile=64)
    server = vae.make_server(tiled, "127.0.0.1:0")
    try:
        x = latents(1, 20, 11)
        got = decoded(vae_pb2_grpc.VaeStub(grpc.insecure_channel(f"127.0.0.1:{server.port}")), x, **RAW)
        expected = postprocess(Decoding(tiled.vae, x, tile=64).run(), "np")
        assert np.array_equal(got, (expected * 255).round().astype(np.uint8))
    finally:
        server.stop(0)
    with pytest.raises(ValueError, match="tile"):
        vae.VaeServicer(tiled.vae, tile=60)


def test_a_small_decode_runs_between_the_pieces_of_an_encode(servicer, stub, monkeypatch):
    order, first_piece, release = [], threading.Event(), threading.Event()
    conv_in, whole = servicer.vae.encoder.conv_in.forward, vae.latents_to_images

    def held_conv_in(x):
        order.append("encode")
        first_piece.set()
        assert release.wait(WAIT_S)
        return conv_in(x)  # the first piece of the encode

    monkeypatch.setattr(servicer.vae.encoder.conv_in, "forward", held_conv_in)
    monkeypatch.setattr(vae, "latents_to_images", lambda *a: order.append("decode") or whole(*a))
    with ThreadPoolExecutor(2) as pool:
        got_encode = pool.submit(encoded, stub, IMAGE, 3, later(0))
        assert first_piece.wait(WAIT_S)
        got_decode = pool.submit(decoded, stub, latents(1, 8, 12), later(1), **RAW)
        wait_for(lambda: servicer.engine.held() == 2)
        release.set()
        got_encode.result(), got_decode.result()
    assert order == ["encode", "decode"]  # the decode ran between the encoder's first piece and the rest
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(got_encode.result().values(), encoded(stub, IMAGE, 3).values()))
