"""The transport cost of the service chain: one Generate through gRPC minus the same work in process.

Run with `make bench` (or `python -m bench.transport [--repeats N] [--replay-repeats N] [--replay-only]
[--replay-processes] [--steps N] [--size N]`).

The headline, checked against the < 15 ms target, is the replay measurement: the real orchestrator over
stage servers that hold no model. During one real request every response each stage sent is recorded;
the replay stages then read and decode (TensorAssembler, as the real servicers do) the whole request
stream the orchestrator sends them, and send the recorded responses back at once, their tensors
re-chunked by to_proto_chunks on every call so the codec cost counts on both sides. Timed both through
SDXLClient.generate (which decodes the PNG) and the raw Orchestrator stub (the stream only). With
--replay-only the slow full comparison below is skipped (one real request is still made, to record).
The replay servers share this process (and its GIL) with the client; --replay-processes measures it again
with each replay stage and the orchestrator in a spawned process of its own, as deployed.

Below both, the grpcio floor (bench/grpc_floor.py): the same calls with the same message counts and bytes,
between handlers that move raw bytes, so what gRPC alone costs for this traffic on this machine.

The full comparison (shown too: it checks the images are equal, but the model's compute makes its
difference too noisy for the target):
Every server is started in this process on loopback (port 0) over the tiny model:
client -> orchestrator -> text encoder -> base -> refiner -> vae. The in-process side is the
pipelines the chain reproduces exactly: SDXLPipeline(denoising_end=0.8, output_type="latent") then
SDXLImg2ImgPipeline(denoising_start=0.8), PNG-encoded as the VAE stage returns it. Watermark off on
both sides. The two paths alternate; the best and the median of each are compared, so the
difference is the per-request cost of the protocol (serialization, copies, loopback, thread hops).
The bytes each stage sends and receives are counted from the messages themselves (ByteSize of
every message the orchestrator exchanges) and checked against the tensor shapes that cross.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import torch

from bench import grpc_floor
from sdxl_core.configs import (
    SDXL_BASE_UNET,
    SDXL_REFINER_UNET,
    TINY_BASE_UNET,
    TINY_REFINER_UNET,
    UNetConfig,
)
from sdxl_core.pipelines import SDXLImg2ImgPipeline, SDXLPipeline
from sdxl_core.tiny import ensure_tiny_model
from sdxl_services.allocator import keep_message_buffers

TARGET_MS = 15.0
PROMPT = "an astronaut riding a horse on the moon"
SEED = 1234
HANDOFF = 0.8
TOKENS = 77
FLOAT32 = 4


class Traffic:
    """Serialized bytes (ByteSize of each protobuf message) per stage and direction, for the requests counted."""

    def __init__(self):
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.messages: dict[tuple[str, str], int] = defaultdict(int)
        self.requests = 0
        self.counting = False
        self.recording: dict[tuple[str, str], list] | None = None  # (stage, response type) -> responses

    def add(self, stage: str, direction: str, message) -> None:
        if self.counting:
            self.bytes[stage, direction] += message.ByteSize()
            self.messages[stage, direction] += 1

    def counted(self, stage: str, direction: str, messages: Iterator) -> Iterator:
        for message in messages:
            self.add(stage, direction, message)
            yield message


def instrument(traffic: Traffic) -> Callable[[], None]:
    """Count every message the orchestrator exchanges with the client and with each stage (and, while
    traffic.recording holds a dict, keep each stage's responses in it); returns the function that undoes it."""
    from sdxl_services import orchestrator

    stage_call = orchestrator.Run.stage_call
    generate = orchestrator.OrchestratorServicer.Generate

    def counted_stage_call(self, name: str, method: Callable, request):
        if hasattr(request, "ByteSize"):
            traffic.add(name, "sent", request)
        else:
            request = traffic.counted(name, "sent", request)
        return recorded(name, stage_call(self, name, method, request))  # the call starts now, as stage_call's

    def recorded(name: str, responses: Iterator) -> Iterator:
        for response in traffic.counted(name, "received", responses):
            if traffic.recording is not None:
                traffic.recording.setdefault((name, type(response).__name__), []).append(response)
            yield response

    def counted_generate(self, request_iterator, context):
        yield from traffic.counted("client", "received",
                                   generate(self, traffic.counted("client", "sent", request_iterator), context))

    orchestrator.Run.stage_call = counted_stage_call
    orchestrator.OrchestratorServicer.Generate = counted_generate

    def undo() -> None:
        orchestrator.Run.stage_call = stage_call
        orchestrator.OrchestratorServicer.Generate = generate

    return undo


def _prompt_bytes(unet: UNetConfig, batch: int) -> int:
    """prompt_embeds + pooled_prompt_embeds, each with its negative, as float32."""
    return 2 * batch * (TOKENS * unet.cross_attention_dim + unet.pooled_projection_dim) * FLOAT32


def analytic(base: UNetConfig, refiner: UNetConfig, latent: int, batch: int) -> dict[str, tuple[int, int]]:
    """Tensor data bytes (no framing) each stage gets and returns: (sent to it, received from it)."""
    latents = batch * 4 * latent * latent * FLOAT32
    return {
        "text_encoder": (0, _prompt_bytes(base, batch) + _prompt_bytes(refiner, batch)),
        "base": (_prompt_bytes(base, batch), latents),
        "refiner": (_prompt_bytes(refiner, batch) + latents, latents),
        "vae": (latents, 0),  # + the PNG, whose size depends on the pixels
    }


def alternate(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each run, `repeats` times, alternating who goes first."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats):
        for name in list(runs)[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def start_chain(model_dir):
    from sdxl_services import denoiser, orchestrator, text_encoder, vae

    servers = {
        "text_encoder": text_encoder.build(model_dir / "base", model_dir / "refiner"),
        "base": denoiser.build(model_dir / "base"),
        "refiner": denoiser.build(model_dir / "refiner"),
        "vae": vae.build(model_dir / "base"),
    }
    addresses = {name: f"127.0.0.1:{server.port}" for name, server in servers.items()}
    servers["orchestrator"] = orchestrator.build(addresses["text_encoder"], addresses["base"], addresses["refiner"],
                                                 addresses["vae"])
    return servers


class Replay:
    """One stage's recorded responses, replayed with the codec work of the real stage: tensors (from the
    recorded chunks) are re-chunked by to_proto_chunks (and packed, where the message packs them) on every
    call, other messages sent as recorded."""

    def __init__(self, responses: list):
        from sdxl_wire.tensors import TensorAssembler

        assembler = TensorAssembler()
        # ("tensor", (response type, name)), ("packed", (first response without its chunks, [names])) or
        # ("message", message)
        self.events: list[tuple[str, object]] = []
        for response in responses:
            if "chunks" in response.DESCRIPTOR.fields_by_name:  # a run of packed messages is one event
                for chunk in response.chunks:
                    assembler.add(chunk)
                names = [c.name for c in response.chunks if c.offset == 0]
                if self.events and self.events[-1][0] == "packed":
                    self.events[-1][1][1].extend(names)
                else:
                    first = type(response)()
                    first.CopyFrom(response)
                    first.ClearField("chunks")
                    self.events.append(("packed", (first, names)))
            elif response.HasField("chunk"):
                assembler.add(response.chunk)
                if response.chunk.offset == 0:
                    self.events.append(("tensor", (type(response), response.chunk.name)))
            else:
                self.events.append(("message", response))
        self.tensors = assembler.finish()

    def __iter__(self) -> Iterator:
        from sdxl_wire.tensors import packed_chunks, to_proto_chunks

        for kind, value in self.events:
            if kind == "message":
                yield value
            elif kind == "packed":
                first, names = value
                for i, chunks in enumerate(packed_chunks({name: self.tensors[name] for name in names})):
                    message = type(first)()
                    if i == 0:
                        message.CopyFrom(first)
                    message.chunks.extend(chunks)
                    yield message
            else:
                response_type, name = value
                for chunk in to_proto_chunks(name, self.tensors[name]):
                    yield response_type(chunk=chunk)


STAGES = ("text_encoder", "base", "refiner", "vae")


def replay_server(stage: str, recording: dict[tuple[str, str], list]):
    """A started, SERVING stage server that holds no model: it reads and decodes its whole request stream as the
    real one does, then replays the responses recorded from the real stage."""
    from sdxl.v1 import denoiser_pb2_grpc, text_encoder_pb2_grpc, vae_pb2_grpc
    from sdxl_services import denoiser, text_encoder, vae
    from sdxl_services.server import Server
    from sdxl_wire.tensors import read_header_stream

    def replay(kind: str) -> Replay:
        return Replay(recording.get((stage, kind), []))

    class TextEncoder(text_encoder_pb2_grpc.TextEncoderServicer):
        def __init__(self):
            self.responses = replay("EncodePromptResponse")

        def EncodePrompt(self, request, context):
            yield from self.responses

    class Denoiser(denoiser_pb2_grpc.DenoiserServicer):
        def __init__(self):
            self.responses = replay("DenoiseResponse")

        def Denoise(self, request_iterator, context):
            responses = iter(self.responses)
            yield next(responses)  # Admitted: the stage sends it before it reads the request
            denoiser.read_stream(request_iterator)
            yield from responses

    class Vae(vae_pb2_grpc.VaeServicer):
        def __init__(self):
            self.decoded, self.encoded = replay("DecodeResponse"), replay("EncodeResponse")

        def Decode(self, request_iterator, context):
            read_header_stream(request_iterator, "DecodeRequest", names={"latents"})  # as Vae.Decode
            yield from self.decoded

        def Encode(self, request_iterator, context):
            vae.read_encode(request_iterator)
            yield from self.encoded

    if stage == "text_encoder":
        add, servicer, service = text_encoder_pb2_grpc.add_TextEncoderServicer_to_server, TextEncoder(), \
            text_encoder.SERVICE
    elif stage in ("base", "refiner"):
        add, servicer, service = denoiser_pb2_grpc.add_DenoiserServicer_to_server, Denoiser(), denoiser.SERVICE
    else:
        add, servicer, service = vae_pb2_grpc.add_VaeServicer_to_server, Vae(), vae.SERVICE
    server = Server(stage, [(add, servicer)], [service], address="127.0.0.1:0")
    server.start()
    server.set_serving()
    return server


def start_replay_chain(recording: dict[tuple[str, str], list]):
    """Replay servers for every stage (replay_server), and a real orchestrator over them; all in this process."""
    from sdxl_services import orchestrator

    servers = {stage: replay_server(stage, recording) for stage in STAGES}
    addresses = {name: f"127.0.0.1:{server.port}" for name, server in servers.items()}
    servers["orchestrator"] = orchestrator.build(addresses["text_encoder"], addresses["base"], addresses["refiner"],
                                                 addresses["vae"], address="127.0.0.1:0")
    return servers


def _serve_child(stage: str, payload, conn) -> None:
    """A child process's main: one replay stage (payload: its recorded responses) or the orchestrator (payload:
    the stages' addresses); sends its port, serves until told to stop."""
    torch.set_num_threads(1)
    keep_message_buffers()  # as `python -m sdxl_services` does in every stage process
    if stage == "orchestrator":
        from sdxl_services import orchestrator

        server = orchestrator.build(*payload, address="127.0.0.1:0")
    else:
        server = replay_server(stage, payload)
    conn.send(server.port)
    try:
        conn.recv()  # anything, or EOF when the parent is gone
    except EOFError:
        pass
    server.stop(0)


class ChildServer:
    """A server in its own process (multiprocessing spawn), as deployed: no GIL shared with the others."""

    def __init__(self, stage: str, payload):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve_child, args=(stage, payload, child), name=f"replay-{stage}",
                                       daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(120):
            self.process.kill()
            raise RuntimeError(f"the {stage} process did not start")
        self.port = self.conn.recv()

    def stop(self, grace=None) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def start_replay_processes(recording: dict[tuple[str, str], list]):
    """start_replay_chain with every stage and the orchestrator in a process of its own."""
    servers = {}
    try:
        for stage in STAGES:
            servers[stage] = ChildServer(stage, {key: responses for key, responses in recording.items()
                                                 if key[0] == stage})
        addresses = tuple(f"127.0.0.1:{servers[stage].port}" for stage in STAGES)
        servers["orchestrator"] = ChildServer("orchestrator", addresses)
    except BaseException:
        for server in servers.values():
            server.stop(0)
        raise
    return servers


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _ms(seconds: list[float]) -> tuple[float, float]:
    return min(seconds) * 1e3, statistics.median(seconds) * 1e3


def measure_replay(recording, size: int, steps: int, repeats: int, reference_png: bytes,
                   processes: bool = False) -> dict[str, list[float]]:
    """Time Generate through the real orchestrator over replay stages: SDXLClient.generate, and the raw stub
    (the stream consumed, no PNG decode), alternating. With `processes`, every server runs in its own process."""
    from sdxl.v1 import orchestrator_pb2_grpc
    from sdxl_client import SDXLClient
    from sdxl_client.client import _prepare

    servers = start_replay_processes(recording) if processes else start_replay_chain(recording)
    client = SDXLClient(f"127.0.0.1:{servers['orchestrator'].port}", timeout=60)
    stub = orchestrator_pb2_grpc.OrchestratorStub(client.channel)
    kwargs = dict(height=size, width=size, num_inference_steps=steps, seed=SEED, refiner="ensemble",
                  high_noise_frac=HANDOFF, watermark=False)
    requests = _prepare(PROMPT, None, None, kwargs)

    def sdxl_client():
        return client.generate(PROMPT, **kwargs)

    def raw_stub():
        return sum(1 for _ in stub.Generate(iter(requests), timeout=60))

    try:
        result = sdxl_client()
        if result.png[0] != reference_png:
            raise RuntimeError("the replay chain's PNG differs from the real chain's")
        for _ in range(3):  # warm-up
            sdxl_client()
            raw_stub()
        times = alternate({"client": sdxl_client, "raw_stub": raw_stub}, repeats)
    finally:
        client.close()
        for server in servers.values():
            server.stop(0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats of the full measurement")
    parser.add_argument("--replay-repeats", type=int, default=30, help="repeats of the replay measurement")
    parser.add_argument("--replay-only", action="store_true",
                        help="one real request (to record the stages' responses), then only the replay measurement")
    parser.add_argument("--replay-processes", action="store_true",
                        help="also run the replay measurement with every stage and the orchestrator in a process "
                             "of its own (spawned), as deployed, so the servers share no GIL")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (latents are size/8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models on shared CPUs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_message_buffers()  # as `python -m sdxl_services` does in every stage process (the servers run in this one)

    from sdxl_client import SDXLClient

    traffic = Traffic()
    undo = instrument(traffic)
    model_dir = ensure_tiny_model()
    if not args.replay_only:
        base = SDXLPipeline.from_pretrained(model_dir / "base", add_watermarker=False)
        refiner = SDXLImg2ImgPipeline.from_pretrained(model_dir / "refiner", add_watermarker=False)
    servers = start_chain(model_dir)
    client = SDXLClient(f"127.0.0.1:{servers['orchestrator'].port}", timeout=600)
    size, steps = args.size, args.steps
    stage_steps: dict[str, int] = {}

    def service():
        def on_progress(stage: str, step: int, total: int):
            stage_steps[stage] = total

        result = client.generate(PROMPT, height=size, width=size, num_inference_steps=steps, seed=SEED,
                                 refiner="ensemble", high_noise_frac=HANDOFF, watermark=False, on_progress=on_progress)
        return result.png[0], np.array(result.images[0])

    def in_process():
        latents = base(PROMPT, height=size, width=size, num_inference_steps=steps, seed=SEED, denoising_end=HANDOFF,
                       output_type="latent").images
        image = refiner(PROMPT, image=latents, num_inference_steps=steps, seed=SEED, denoising_start=HANDOFF).images[0]
        return _png(image), np.array(image)

    print(f"transport: tiny model, {size}x{size} ({size // 8}x{size // 8} latents), batch 1, CFG on, "
          f"{steps} steps, ensemble at {HANDOFF}, {args.threads} thread(s)")
    times: dict[str, list[float]] = {"service": [], "in_process": []}
    try:
        if not args.replay_only:
            # Warm-up (first calls pay for lazy init and connection setup), then one counted request.
            service()
            local_png, local_pixels = in_process()
        traffic.counting, traffic.recording = True, {}
        service_png, service_pixels = service()
        traffic.counting = False
        recording, traffic.recording = traffic.recording, None
        if not (stage_steps.get("base", 0) >= 1 and stage_steps.get("refiner", 0) >= 1):
            print(f"WARNING: a stage runs no step at {steps} steps: {stage_steps}; use more --steps")
        if not args.replay_only:
            times = alternate({"service": service, "in_process": in_process}, args.repeats)
    finally:
        client.close()
        for server in servers.values():
            server.stop(0)
    undo()  # the replay chain runs the orchestrator as shipped, uninstrumented

    from sdxl_wire.images import from_bytes

    decode_s = []
    for _ in range(5):  # the client hands back decoded images; the in-process path has no PNG to decode
        start = time.perf_counter()
        from_bytes(service_png)
        decode_s.append(time.perf_counter() - start)
    print(f"steps per stage (service progress): base {stage_steps.get('base')}, refiner {stage_steps.get('refiner')}")

    if not args.replay_only:
        diff = np.abs(service_pixels.astype(np.int16) - local_pixels.astype(np.int16)).max()
        print(f"\nFULL CHAIN vs IN-PROCESS ({args.repeats} alternating repeats; the model's compute dominates, "
              "so this difference is indicative only)")
        print(f"images identical: {np.array_equal(service_pixels, local_pixels)} (max abs pixel diff {diff}); "
              f"PNG bytes identical: {service_png == local_png} ({len(service_png)} bytes)")
        (s_best, s_med), (l_best, l_med) = _ms(times["service"]), _ms(times["in_process"])
        print(f"{'path':<12} {'best ms':>10} {'median ms':>10}")
        print(f"{'service':<12} {s_best:>10.1f} {s_med:>10.1f}")
        print(f"{'in-process':<12} {l_best:>10.1f} {l_med:>10.1f}")
        print(f"service minus in-process: best {s_best - l_best:+.1f} ms, median {s_med - l_med:+.1f} ms "
              f"(of which the client's PNG decode {min(decode_s) * 1e3:.1f} ms); ratio best {s_best / l_best:.3f}, "
              f"median {s_med / l_med:.3f}")
        # Run-to-run spread of the compute alone: a difference smaller than it says nothing.
        spread = min(max(t) - min(t) for t in times.values()) * 1e3
        print(f"run-to-run spread {spread:.0f} ms"
              + (f" > the {TARGET_MS:.0f} ms target: inconclusive for it" if spread > TARGET_MS else ""))

    latent = size // 8
    expected = analytic(TINY_BASE_UNET, TINY_REFINER_UNET, latent, 1)
    print("\nbytes per request, serialized messages as the orchestrator sends/receives them (measured),")
    print("against the tensor data alone from the shapes (analytic; the VAE's reply is the PNG, measured only):")
    print(f"{'stage':<13} {'sent msgs':>9} {'sent B':>11} {'analytic':>11} {'recv msgs':>9} {'recv B':>11} "
          f"{'analytic':>11}")
    total_measured = total_analytic = 0
    for stage in ("client", "text_encoder", "base", "refiner", "vae"):
        sent, received = traffic.bytes[stage, "sent"], traffic.bytes[stage, "received"]
        a_sent, a_recv = expected.get(stage, (0, 0))
        if stage in ("vae", "client"):
            a_recv = len(service_png)
        print(f"{stage:<13} {traffic.messages[stage, 'sent']:>9} {sent:>11,} {a_sent:>11,} "
              f"{traffic.messages[stage, 'received']:>9} {received:>11,} {a_recv:>11,}")
        if stage != "client":
            total_measured += sent + received
            total_analytic += a_sent + a_recv
    print(f"{'stages total':<13} measured {total_measured:,} B, analytic {total_analytic:,} B "
          f"(framing overhead {total_measured - total_analytic:+,} B, "
          f"{(total_measured - total_analytic) / total_analytic:+.2%})")
    full = analytic(SDXL_BASE_UNET, SDXL_REFINER_UNET, latent, 1)
    print("full-size SDXL, same shapes (analytic tensor bytes, float32): " + ", ".join(
        f"{stage} sent {s:,} / received {r:,}" for stage, (s, r) in full.items())
          + f"; total {sum(s + r for s, r in full.values()):,} B + the PNG")

    replay = measure_replay(recording, size, steps, args.replay_repeats, service_png)
    rows = [("", replay)]
    if args.replay_processes:
        rows.append((", servers in processes", measure_replay(recording, size, steps, args.replay_repeats,
                                                              service_png, processes=True)))
    print(f"\nTRANSPORT (headline): the real orchestrator over replay stages that hold no model -- each reads and "
          f"decodes\n(TensorAssembler) its whole request stream, then re-chunks (to_proto_chunks) and sends the "
          f"responses\nrecorded from the real stages; same messages, same bytes, no compute. Loopback, "
          f"{args.replay_repeats} alternating repeats;\nall servers in this process"
          + ("; then (servers in processes) each stage and the orchestrator in a spawned process of its own, as "
             "deployed." if args.replay_processes else "."))
    print(f"{'path':<66} {'best ms':>10} {'median ms':>10}")
    medians = []
    for suffix, times in rows:
        (c_best, c_med), (r_best, r_med) = _ms(times["client"]), _ms(times["raw_stub"])
        print(f"{'SDXLClient.generate (incl. PNG decode)' + suffix:<66} {c_best:>10.1f} {c_med:>10.1f}")
        print(f"{'raw Orchestrator.Generate stub (no decode)' + suffix:<66} {r_best:>10.1f} {r_med:>10.1f}")
        medians += [("SDXLClient.generate" + suffix, c_med), ("raw stub, PNG decode excluded" + suffix, r_med)]
    pattern = {stage: {way: (traffic.messages[stage, way], traffic.bytes[stage, way]) for way in ("sent", "received")}
               for stage in ("client", *STAGES)}
    f_best, f_med = grpc_floor.measure(pattern, args.replay_repeats)
    label = "grpcio floor: the same calls, messages and bytes, raw-bytes handlers"
    print(f"{label:<66} {f_best:>10.1f} {f_med:>10.1f}")
    print(f"client PNG decode alone: {min(decode_s) * 1e3:.1f} ms")
    for label, median in medians:
        print(f"target < {TARGET_MS:.0f} ms per request on loopback, {label} (median): "
              f"{'MET' if median < TARGET_MS else 'NOT MET'} ({median:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
