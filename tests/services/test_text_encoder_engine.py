"""The text encoder's engine: concurrent EncodePrompt calls of one key share one encode_prompt call, on the
engine's worker only, and each gets what it gets alone; a cancelled call leaves the others as they were."""

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from sdxl.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from sdxl_services import text_encoder
from sdxl_services.stage import load, parse_args, server_options
from tests.wire.streams import assemble

BASE, REFINER = text_encoder_pb2.TARGET_BASE, text_encoder_pb2.TARGET_REFINER
from tests.services.engines import later, recording, wait_for

WAIT_S = 60
# Hidden states come out bit-equal batched; bigG's pooled projection, a GEMM over more rows, sums in another
# order (measured up to 7e-7 on CPU fp32).
ATOL = 1e-5


class Gate:
    """Wraps a module's forward: counts calls and their rows and threads; the first call waits until `open`."""

    def __init__(self, module, monkeypatch):
        self.rows, self.threads = [], set()
        self.entered, self.opened = threading.Event(), threading.Event()
        forward = module.forward

        def gated(input_ids, *args, **kwargs):
            self.rows.append(input_ids.shape[0])
            self.threads.add(threading.current_thread().name)
            self.entered.set()
            assert self.opened.wait(WAIT_S)
            return forward(input_ids, *args, **kwargs)

        monkeypatch.setattr(module, "forward", gated)


@pytest.fixture(scope="module")
def servicer(tiny_model_dir):
    servicer = text_encoder.load_servicer(tiny_model_dir / "base", tiny_model_dir / "refiner")
    yield servicer
    servicer.close()


@pytest.fixture(scope="module")
def stub(servicer):
    server = text_encoder.make_server(servicer, "127.0.0.1:0")
    yield text_encoder_pb2_grpc.TextEncoderStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    server.stop(0)


def bigg(servicer, target=BASE):
    return servicer.encoders[target].text_encoders[1]


def encode(stub, request, timeout: float = WAIT_S) -> dict[str, torch.Tensor]:
    return assemble(c for response in stub.EncodePrompt(request, timeout=timeout) for c in response.chunks)


def overlapped(stub, engine, gate, monkeypatch, first, requests, pool):
    """Run `first` until the worker is inside the gated encoder, submit `requests` in order while it waits, then
    open the gate: the futures of `first` and `requests`, and the jobs in order."""
    jobs = recording(monkeypatch, engine)
    head = pool.submit(encode, stub, first)
    assert gate.entered.wait(WAIT_S)
    futures = []
    for request in requests:
        futures.append(pool.submit(encode, stub, request, later(1 + len(futures))))
        wait_for(lambda: len(jobs) == 1 + len(futures))  # each submitted before the next: a fixed order
    gate.opened.set()
    return head, futures, jobs


def assert_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and got[name].dtype == tensor.dtype, name
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=ATOL, msg=name)


R = text_encoder_pb2.EncodePromptRequest
FIRST = R(prompt=["first"], targets=[BASE])  # unguided: one bigG call, held at the gate
GROUPS = {  # by key: targets, guided, zero negatives
    "both_zeros": [R(prompt=["a cat", "a dog"], num_images_per_prompt=2, targets=[BASE, REFINER], guided=True),
                   R(prompt=["a hill"], prompt_2=[""], targets=[BASE, REFINER], guided=True),  # "" -> prompt
                   R(prompt=["x", "y", "z"], prompt_2=["p", "q", ""], targets=[BASE, REFINER], guided=True)],
    "base_negatives": [R(prompt=["a cat"], negative_prompt=["ugly"], targets=[BASE], guided=True),
                       R(prompt=["a dog", "a bird"], negative_prompt=["blurry"], negative_prompt_2=["dark"],
                         num_images_per_prompt=3, targets=[BASE], guided=True)],
    "base_unguided": [R(prompt=["z"], targets=[BASE])],
}


def test_concurrent_calls_of_one_key_share_one_encode_and_each_gets_its_solo_embeddings(servicer, stub,
                                                                                        monkeypatch):
    requests = [r for group in GROUPS.values() for r in group]
    solo = [encode(stub, r) for r in requests]
    base, refiner = Gate(bigg(servicer), monkeypatch), Gate(bigg(servicer, REFINER), monkeypatch)
    refiner.opened.set()
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        head, futures, _ = overlapped(stub, servicer.engine, base, monkeypatch, FIRST, requests, pool)
        head.result(WAIT_S)
        for future, want in zip(futures, solo):
            assert_close(future.result(WAIT_S), want)
    # first; both_zeros (6 prompts, zero negatives); base_negatives (3 prompts, prompts and negatives); unguided
    assert base.rows == [1, 6, 3, 3, 1]  # alone: 9 calls
    assert refiner.rows == [6, 6]  # the refiner forces no zeros: it encodes "" negatives; alone: 6 calls
    assert base.threads == refiner.threads == {"sdxl-text_encoder-engine"}


def test_a_cancelled_call_is_dropped_and_the_others_are_served_together(servicer, stub, monkeypatch):
    group = GROUPS["base_negatives"]
    solo = [encode(stub, r) for r in group]
    gate = Gate(bigg(servicer), monkeypatch)
    jobs = recording(monkeypatch, servicer.engine)
    with ThreadPoolExecutor(3) as pool:
        head = pool.submit(encode, stub, FIRST)
        assert gate.entered.wait(WAIT_S)
        cancelled = stub.EncodePrompt(R(prompt=["gone"] * 4, negative_prompt=["ugly"], targets=[BASE], guided=True),
                                      timeout=later(1))
        wait_for(lambda: len(jobs) == 2)
        futures = []
        for request in group:
            futures.append(pool.submit(encode, stub, request, later(2 + len(futures))))
            wait_for(lambda: len(jobs) == 2 + len(futures))
        cancelled.cancel()
        assert jobs[1].ended.wait(WAIT_S)  # the server saw the cancellation before the worker takes the job
        gate.opened.set()
        head.result(WAIT_S)
        for future, want in zip(futures, solo):
            assert_close(future.result(WAIT_S), want)
    with pytest.raises(grpc.RpcError) as error:
        next(cancelled)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    assert gate.rows == [1, 3, 3]  # the cancelled call's 4 prompts never reached the encoder


@pytest.mark.parametrize("policy, max_rows, rows", [
    ("fifo", None, [1, 2, 1, 3]),  # one call at a time
    ("batch", 3, [1, 3, 3]),  # 2 + 1 prompts fit in 3 rows; the third call's 3 in the next encode
])
def test_fifo_and_max_batch_rows_bound_what_one_encode_holds(servicer, monkeypatch, policy, max_rows, rows):
    engined = text_encoder.TextEncoderServicer(servicer.encoders, policy, max_rows)  # the same encoders
    server = text_encoder.make_server(engined, "127.0.0.1:0")
    stub = text_encoder_pb2_grpc.TextEncoderStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    requests = [R(prompt=["a", "b"], targets=[BASE]), R(prompt=["c"], targets=[BASE]),
                R(prompt=["d", "e", "f"], targets=[BASE])]
    try:
        gate = Gate(bigg(servicer), monkeypatch)
        with ThreadPoolExecutor(4) as pool:
            head, futures, _ = overlapped(stub, engined.engine, gate, monkeypatch, FIRST, requests, pool)
            for future in [head, *futures]:
                future.result(WAIT_S)
        assert gate.rows == rows
    finally:
        server.stop(0)


def test_a_bad_request_is_refused_while_the_worker_is_busy_and_the_server_keeps_serving(servicer, stub,
                                                                                        monkeypatch):
    gate = Gate(bigg(servicer), monkeypatch)
    with ThreadPoolExecutor(1) as pool:
        head = pool.submit(encode, stub, FIRST)
        assert gate.entered.wait(WAIT_S)
        with pytest.raises(grpc.RpcError) as error:  # checked on the call's thread: no wait for the worker
            encode(stub, R(prompt=["a", "b"], negative_prompt=["x", "y", "z"], targets=[BASE]))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "negative_prompt" in error.value.details()
        gate.opened.set()
        head.result(WAIT_S)
    assert encode(stub, R(prompt=["ok"], targets=[BASE]))["base/prompt_embeds"].shape[0] == 1


def test_the_stage_serves_many_calls_at_once_with_the_policy_and_row_bound_it_is_given(tiny_model_dir):
    args = parse_args(["text_encoder", "--model", str(tiny_model_dir / "base"), "--policy", "fifo",
                       "--max-batch-rows", "5"])
    options = server_options(args)
    assert (options.max_concurrency, options.max_queue) == (64, 64)
    servicer = load(args)
    try:
        assert servicer.engine.policy == "fifo" and servicer.engine.max_rows == 5
    finally:
        servicer.close()
