"""Tracing: one trace per Generate, a span per stage call and per denoise step, all with the client's request id."""

import threading
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sdxl.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from sdxl_services import denoiser, orchestrator, text_encoder, tracing, vae
from sdxl_services.admission import Admission
from sdxl_services.interceptors import StageInterceptor
from sdxl_wire import MAX_MESSAGE_BYTES, REQUEST_ID_KEY

STEPS = 4
REQUEST_ID = "trace-me-1"
WAIT_S = 30.0

pytestmark = pytest.mark.usefixtures("one_thread")

# The SDK's global provider can be set once per process: this one is handed to tracing.configure instead.
EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture
def traced(monkeypatch):
    """Tracing on into EXPORTER for the test; off again after it."""
    monkeypatch.setattr(tracing, "_tracer", None)
    assert tracing.configure("test", provider=PROVIDER)
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def _serve(stage: str, add, servicer) -> tuple[grpc.Server, str]:
    """A server as services/server.py builds one, with the tracing interceptor after StageInterceptor."""
    serving = threading.Event()
    serving.set()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        interceptors=[StageInterceptor(stage, Admission(64, 64), serving), tracing.server_interceptor(stage)])
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def traced_stack(tiny_model_dir):
    """Text encoder, base, VAE and an orchestrator over them, apart from the session's servers: an orchestrator
    stub."""
    servicers = {
        "text_encoder": (text_encoder.add_servicer, text_encoder.load_servicer(tiny_model_dir / "base")),
        "base": (denoiser.add_servicer, denoiser.load_servicer(tiny_model_dir / "base")),
        "vae": (vae.add_servicer, vae.load_servicer(tiny_model_dir / "base")),
    }
    servers, addresses = [], {}
    for stage, (add, servicer) in servicers.items():
        server, addresses[stage] = _serve(stage, add, servicer)
        servers.append(server)
    stubs = orchestrator.Stubs(addresses["text_encoder"], addresses["base"], None, addresses["vae"], MAX_MESSAGE_BYTES)
    server, address = _serve("orchestrator", orchestrator_pb2_grpc.add_OrchestratorServicer_to_server,
                             orchestrator.OrchestratorServicer(stubs))
    servers.append(server)
    channel = grpc.insecure_channel(address)
    yield orchestrator_pb2_grpc.OrchestratorStub(channel)
    channel.close()
    for server in servers:
        server.stop(0)
    stubs.close()
    for _, servicer in servicers.values():
        servicer.close()


def _generate(stub) -> None:
    params = orchestrator_pb2.GenerateParams(prompt=["a red cube"], height=64, width=64, num_inference_steps=STEPS,
                                             seed=1)
    responses = stub.Generate(iter([orchestrator_pb2.GenerateRequest(params=params)]), timeout=WAIT_S,
                              metadata=((REQUEST_ID_KEY, REQUEST_ID),))
    assert any(r.WhichOneof("event") == "result" for r in responses)


def _wait_for(exporter, count: int) -> list:
    """The finished spans once `count` server spans are among them: a server span ends after its last response."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        spans = exporter.get_finished_spans()
        if sum(s.kind is trace.SpanKind.SERVER for s in spans) >= count:
            return list(spans)
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} server spans after {WAIT_S} s: {[s.name for s in spans]}")


def test_one_generate_is_one_trace_of_stage_and_step_spans(traced, traced_stack):
    _generate(traced_stack)
    spans = _wait_for(traced, 4)
    by_id = {s.context.span_id: s for s in spans}
    servers = {s.name: s for s in spans if s.kind is trace.SpanKind.SERVER}

    assert {s.context.trace_id for s in spans} == {servers["sdxl.v1.Orchestrator/Generate"].context.trace_id}
    assert all(s.attributes["sdxl.request_id"] == REQUEST_ID for s in spans)
    root = servers.pop("sdxl.v1.Orchestrator/Generate")
    assert root.parent is None
    assert root.attributes["sdxl.stage"] == "orchestrator"

    for name, stage in (("sdxl.v1.TextEncoder/EncodePrompt", "text_encoder"), ("sdxl.v1.Denoiser/Denoise", "base"),
                        ("sdxl.v1.Vae/Decode", "vae")):
        server = servers.pop(name)
        service, method = name.split("/")
        assert (server.attributes["rpc.service"], server.attributes["rpc.method"]) == (service, method)
        assert server.attributes["sdxl.stage"] == stage
        client = by_id[server.parent.span_id]  # through the traceparent the orchestrator sent
        assert (client.name, client.kind) == (f"stage {stage} {method}", trace.SpanKind.CLIENT)
        while client.kind is trace.SpanKind.CLIENT:  # one client span, or two once the orchestrator wraps its own
            client = by_id[client.parent.span_id]
        assert client is root
    assert not servers

    base = next(s for s in spans if s.name == "sdxl.v1.Denoiser/Denoise")
    steps = sorted((s for s in spans if s.name == "denoise step"), key=lambda s: s.attributes["step"])
    assert [s.attributes["step"] for s in steps] == list(range(1, STEPS + 1))
    assert all(s.parent.span_id == base.context.span_id for s in steps)
    assert all(s.attributes["total"] == STEPS and s.attributes["rows_in_forward"] == 2 for s in steps)


def test_a_long_calls_span_is_current_only_while_the_call_is_made(traced):
    with tracing.span("outer") as outer:
        long = tracing.LongCall("base", "Denoise")
        with long.current():
            metadata = dict(tracing.outgoing())  # what the call is made with
        assert trace.get_current_span() is outer  # the client span never leaks into the caller
        with tracing.client_span("text_encoder", "EncodePrompt"):
            pass  # a call made while the long one is open: its sibling, not its child
        long.end()
    spans = {s.name: s for s in traced.get_finished_spans()}
    client, sibling = spans["stage base Denoise"], spans["stage text_encoder EncodePrompt"]
    assert client.parent.span_id == sibling.parent.span_id == outer.get_span_context().span_id
    assert f"{client.context.span_id:016x}" in metadata["traceparent"]


def test_off_without_an_endpoint_changes_nothing(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracing, "_tracer", None)
    assert not tracing.configure("test")
    assert tracing.outgoing() == ()
    with tracing.LongCall("base", "Denoise").current(), tracing.client_span("vae", "Decode"):
        assert tracing.outgoing() == ()
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    details = SimpleNamespace(method="/sdxl.v1.Vae/Decode", invocation_metadata=())
    assert tracing.server_interceptor("vae").intercept_service(lambda _: handler, details) is handler
    with tracing.span("nothing", step=1) as span:
        assert span is None


@pytest.mark.parametrize("environ, on", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_exporting_follows_the_otel_variables(environ, on):
    assert tracing.exporting(environ) is on
