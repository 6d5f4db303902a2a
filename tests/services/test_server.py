"""The shared stage server: health, reflection, status mapping, admission, drain, cancellation, request ids."""

import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sdxl_core.errors import ModelTypeMismatchError, WeightsNotFoundError
from sdxl_services.calls import call_options, ensure_active, request_id, watch
from sdxl_services.errors import Cancelled, DeadlineExceeded, Draining, FailedPrecondition, QueueFull
from sdxl_services.logs import RequestIdFilter
from sdxl_services.server import Server, ServerOptions
from sdxl_wire import REQUEST_ID_KEY

ROOT = Path(__file__).resolve().parents[2]

SERVICE = "test.Echo"
STAGE = "teststage"
WAIT_S = 3.0  # upper bound on any wait; tests normally finish their waits in milliseconds
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING

RAISES = {
    b"value": (ValueError("steps must be >= 1, got 0"), grpc.StatusCode.INVALID_ARGUMENT),
    b"weights": (WeightsNotFoundError("no unet/ in /models/x"), grpc.StatusCode.FAILED_PRECONDITION),
    b"mismatch": (ModelTypeMismatchError("refiner weights, base asked"), grpc.StatusCode.FAILED_PRECONDITION),
    b"precondition": (FailedPrecondition("no refiner loaded"), grpc.StatusCode.FAILED_PRECONDITION),
    b"full": (QueueFull("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    b"draining": (Draining("going away"), grpc.StatusCode.UNAVAILABLE),
    b"cancelled": (Cancelled("stop"), grpc.StatusCode.CANCELLED),
    b"deadline": (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    b"boom": (RuntimeError("kaboom"), grpc.StatusCode.INTERNAL),
}


class Probe:
    """What the handlers report to a test, and the gate that holds the slow handler."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.ended = threading.Event()  # the watch() event fired inside the handler


def _raise_for(request: bytes) -> None:
    if request in RAISES:
        raise RAISES[request][0]


def _handlers(probe: Probe) -> grpc.GenericRpcHandler:
    def echo(request, context):
        _raise_for(request)
        return request

    def whoami(request, context):
        logging.getLogger(f"sdxl.{STAGE}.work").info("working")
        return request_id().encode()

    def forward(request, context):
        options = call_options(context, margin_s=0.5)
        return json.dumps(options).encode()

    def abort(request, context):
        if request == b"set":  # set a status, then raise
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details("no such model")
            raise KeyError("model")
        context.abort(grpc.StatusCode.NOT_FOUND, "no such model")

    def slow(request, context):
        probe.started.set()
        probe.release.wait(WAIT_S)
        return b"done"

    def until_ended(request, context):
        ended = watch(context)
        probe.started.set()
        if ended.wait(WAIT_S):
            probe.ended.set()
        if request != b"ignore":
            ensure_active(context)
        return b"not ended"

    def count(request, context):
        yield b"1"
        yield b"2"
        _raise_for(request)

    def ticks(request, context):
        probe.started.set()
        while True:
            yield b"tick"
            time.sleep(0.01)

    def total(requests, context):
        parts = []
        for part in requests:
            _raise_for(part)
            parts.append(part)
        return b"".join(parts)

    def chat(requests, context):
        for part in requests:
            _raise_for(part)
            yield part

    def unary(fn):
        return grpc.unary_unary_rpc_method_handler(fn)

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": unary(echo),
            "WhoAmI": unary(whoami),
            "Forward": unary(forward),
            "Abort": unary(abort),
            "Slow": unary(slow),
            "UntilEnded": unary(until_ended),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
            "Total": grpc.stream_unary_rpc_method_handler(total),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )


class Client:
    """Raw-bytes calls to the test service, plus health and reflection stubs."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.reflection = reflection_pb2_grpc.ServerReflectionStub(self.channel)

    def unary(self, name):
        return self.channel.unary_unary(f"/{SERVICE}/{name}")

    def unary_stream(self, name):
        return self.channel.unary_stream(f"/{SERVICE}/{name}")

    def stream_unary(self, name):
        return self.channel.stream_unary(f"/{SERVICE}/{name}")

    def stream_stream(self, name):
        return self.channel.stream_stream(f"/{SERVICE}/{name}")

    def status(self, service: str = SERVICE) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT_S).status


@pytest.fixture
def probe():
    probe = Probe()
    yield probe
    probe.release.set()  # never leave a handler thread blocked


@pytest.fixture
def start(probe):
    """start(**options) -> (Server, Client), on 127.0.0.1 port 0; stopped at teardown."""
    started = []

    def _start(serving: bool = True, **options):
        server = Server(STAGE, [_handlers(probe)], [SERVICE], "127.0.0.1:0", ServerOptions(**options))
        server.start()
        if serving:
            server.set_serving()
        client = Client(server.port)
        started.append((server, client))
        return server, client

    yield _start
    for server, client in started:
        client.channel.close()
        server.stop(0)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _records(caplog, **fields) -> list[logging.LogRecord]:
    return [r for r in caplog.records if all(getattr(r, k, None) == v for k, v in fields.items())]


def _until(condition, timeout: float = WAIT_S) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def test_health_is_not_serving_until_set_serving(start):
    server, client = start(serving=False)
    assert client.status() == NOT_SERVING
    assert client.status("") == NOT_SERVING
    server.set_serving()
    assert client.status() == SERVING
    assert client.status("") == SERVING


def test_reflection_lists_the_stage_describe_health_and_reflection_services(start):
    _, client = start()
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = client.reflection.ServerReflectionInfo(iter([request]), timeout=WAIT_S)
    names = {s.name for s in response.list_services_response.service}
    assert names == {SERVICE, "sdxl.v1.StageInfo", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


@pytest.mark.parametrize("request_bytes", list(RAISES))
def test_exceptions_map_to_status_codes_and_the_server_keeps_serving(start, request_bytes):
    _, client = start()
    exc, expected = RAISES[request_bytes]
    code, details = _code(lambda: client.unary("Echo")(request_bytes, timeout=WAIT_S))
    assert code == expected
    if code == grpc.StatusCode.INTERNAL:  # an unexpected error: no library text reaches the client
        assert str(exc) not in details and details.startswith("internal error; request id ")
    else:
        assert str(exc) in details
    assert client.unary("Echo")(b"fine", timeout=WAIT_S) == b"fine"


def test_unexpected_exception_is_internal_naming_the_request_id_with_the_traceback_only_logged(start, caplog):
    caplog.set_level(logging.INFO, logger=f"sdxl.{STAGE}")
    _, client = start()
    code, details = _code(lambda: client.unary("Echo")(b"boom", metadata=((REQUEST_ID_KEY, "req-9"),),
                                                        timeout=WAIT_S))
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error; request id req-9")
    tracebacks = [r for r in caplog.records if r.exc_info and r.levelno == logging.ERROR]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info[0] is RuntimeError


@pytest.mark.parametrize("request_bytes", [b"abort", b"set"])
def test_a_status_the_handler_sets_is_kept(start, request_bytes):
    _, client = start()
    code = _code(lambda: client.unary("Abort")(request_bytes, timeout=WAIT_S))
    assert code == (grpc.StatusCode.NOT_FOUND, "no such model")


def test_error_while_streaming_responses_is_mapped_after_the_sent_ones(start):
    _, client = start()
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for response in client.unary_stream("Count")(b"value", timeout=WAIT_S):
            received.append(response)
    assert received == [b"1", b"2"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(client.unary_stream("Count")(b"ok", timeout=WAIT_S)) == [b"1", b"2"]


def test_errors_in_client_streaming_handlers_are_mapped(start):
    _, client = start()
    total, chat = client.stream_unary("Total"), client.stream_stream("Chat")
    assert _code(lambda: total(iter([b"a", b"value"]), timeout=WAIT_S))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: list(chat(iter([b"a", b"weights"]), timeout=WAIT_S)))[0] == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert total(iter([b"a", b"b"]), timeout=WAIT_S) == b"ab"
    assert list(chat(iter([b"a", b"b"]), timeout=WAIT_S)) == [b"a", b"b"]


def test_past_the_queue_a_request_is_refused_at_once_while_health_answers(start, probe):
    _, client = start(max_concurrency=1, max_queue=0)
    running = client.unary("Slow").future(b"", timeout=WAIT_S)
    assert probe.started.wait(WAIT_S)
    began = time.monotonic()
    code, details = _code(lambda: client.unary("Echo")(b"x", timeout=WAIT_S))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in details
    assert time.monotonic() - began < 1.0  # not after the 3 s the slow call holds its slot
    assert client.status() == SERVING
    probe.release.set()
    assert running.result() == b"done"
    assert client.unary("Echo")(b"x", timeout=WAIT_S) == b"x"


def test_a_queued_request_waits_for_the_running_one(start, probe):
    server, client = start(max_concurrency=1, max_queue=1)
    running = client.unary("Slow").future(b"", timeout=WAIT_S)
    assert probe.started.wait(WAIT_S)
    queued = client.unary("Echo").future(b"queued", timeout=WAIT_S)
    assert _until(lambda: server.admission.in_flight == 2)
    time.sleep(0.05)
    assert not queued.done()
    probe.release.set()
    assert running.result() == b"done"
    assert queued.result() == b"queued"


def test_cancelling_a_stream_frees_its_slot(start, probe, caplog):
    caplog.set_level(logging.INFO, logger=f"sdxl.{STAGE}")
    _, client = start(max_concurrency=1, max_queue=0)
    stream = client.unary_stream("Ticks")(b"", timeout=WAIT_S)
    assert next(stream) == b"tick"
    stream.cancel()
    assert _until(lambda: _records(caplog, method=f"/{SERVICE}/Ticks"))
    assert _records(caplog, method=f"/{SERVICE}/Ticks")[0].code == "CANCELLED"
    assert client.unary("Echo")(b"x", timeout=WAIT_S) == b"x"


def test_stop_finishes_running_work_refuses_new_work_and_reports_not_serving(start, probe):
    server, client = start()
    running = client.unary("Slow").future(b"", timeout=WAIT_S)
    assert probe.started.wait(WAIT_S)
    stopper = threading.Thread(target=server.stop, args=(WAIT_S,))
    stopper.start()
    assert _until(lambda: client.status() == NOT_SERVING)
    assert client.status("") == NOT_SERVING
    assert _code(lambda: client.unary("Echo")(b"x", timeout=WAIT_S))[0] == grpc.StatusCode.UNAVAILABLE
    assert stopper.is_alive()
    probe.release.set()
    assert running.result() == b"done"
    stopper.join(WAIT_S)
    assert not stopper.is_alive()


def test_stop_cancels_work_still_running_when_the_grace_ends(start, probe):
    server, client = start()
    running = client.unary("UntilEnded").future(b"", timeout=WAIT_S)
    assert probe.started.wait(WAIT_S)
    began = time.monotonic()
    server.stop(0.1)
    assert time.monotonic() - began < 2.0
    assert probe.ended.wait(WAIT_S)
    with pytest.raises(grpc.RpcError):
        running.result()


@pytest.mark.parametrize("request_bytes", [b"", b"ignore"], ids=["raises", "returns"])
def test_client_cancellation_sets_the_watch_event_and_logs_cancelled(start, probe, caplog, request_bytes):
    caplog.set_level(logging.INFO, logger=f"sdxl.{STAGE}")
    _, client = start()
    call = client.unary("UntilEnded").future(request_bytes, timeout=WAIT_S)
    assert probe.started.wait(WAIT_S)
    call.cancel()
    assert probe.ended.wait(1.0)
    assert _until(lambda: _records(caplog, method=f"/{SERVICE}/UntilEnded"))
    assert _records(caplog, method=f"/{SERVICE}/UntilEnded")[0].code == "CANCELLED"


def test_a_passed_deadline_sets_the_watch_event(start, probe, caplog):
    caplog.set_level(logging.INFO, logger=f"sdxl.{STAGE}")
    _, client = start()
    began = time.monotonic()
    code, _ = _code(lambda: client.unary("UntilEnded")(b"", timeout=0.2))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert probe.ended.wait(1.0)
    assert time.monotonic() - began < 2.0
    assert _until(lambda: _records(caplog, method=f"/{SERVICE}/UntilEnded"))
    assert _records(caplog, method=f"/{SERVICE}/UntilEnded")[0].code == "DEADLINE_EXCEEDED"


def test_request_id_from_metadata_is_bound_and_logged(start, caplog):
    caplog.set_level(logging.INFO, logger=f"sdxl.{STAGE}")
    _, client = start()
    assert client.unary("WhoAmI")(b"", metadata=((REQUEST_ID_KEY, "req-42"),), timeout=WAIT_S) == b"req-42"
    (record,) = _records(caplog, request_id="req-42")
    assert (record.name, record.stage, record.method, record.code) == (
        f"sdxl.{STAGE}",
        STAGE,
        f"/{SERVICE}/WhoAmI",
        "OK",
    )
    assert record.total_ms >= record.queue_ms >= 0
    assert "request_id=req-42" in record.getMessage()


def test_stage_code_log_records_carry_the_request_id(start, caplog):
    caplog.set_level(logging.INFO, logger=f"sdxl.{STAGE}")
    caplog.handler.addFilter(RequestIdFilter())
    _, client = start()
    client.unary("WhoAmI")(b"", metadata=((REQUEST_ID_KEY, "req-9"),), timeout=WAIT_S)
    (record,) = [r for r in caplog.records if r.getMessage() == "working"]
    assert record.request_id == "req-9"


def test_a_request_id_is_generated_when_absent(start, caplog):
    caplog.set_level(logging.INFO, logger=f"sdxl.{STAGE}")
    _, client = start()
    first = client.unary("WhoAmI")(b"", timeout=WAIT_S).decode()
    second = client.unary("WhoAmI")(
        b"", metadata=((REQUEST_ID_KEY, "spaces and ; are refused"),), timeout=WAIT_S
    ).decode()
    assert len(first) == 32 and len(second) == 32 and first != second
    assert [r.request_id for r in _records(caplog, method=f"/{SERVICE}/WhoAmI")] == [first, second]
    assert request_id() is None  # nothing leaks into the test's own context


def test_call_options_forward_the_request_id_and_the_deadline_less_a_margin(start):
    _, client = start()
    forward = client.unary("Forward")
    options = json.loads(forward(b"", metadata=((REQUEST_ID_KEY, "req-7"),), timeout=2.0))
    assert options["metadata"] == [[REQUEST_ID_KEY, "req-7"]]
    assert 1.0 < options["timeout"] <= 1.5 + 0.05  # 2 s less the 0.5 s margin; grpc rounds deadlines up by ms
    assert json.loads(forward(b""))["timeout"] is None  # no deadline: none forwarded


def test_stop_refuses_queued_requests_so_they_retry_elsewhere(start, probe):
    server, client = start(max_concurrency=1, max_queue=1)
    running = client.unary("Slow").future(b"", timeout=WAIT_S)
    assert probe.started.wait(WAIT_S)
    queued = client.unary("Echo").future(b"queued", timeout=WAIT_S)
    assert _until(lambda: server.admission.in_flight == 2)
    stopper = threading.Thread(target=server.stop, args=(WAIT_S,))
    stopper.start()
    assert queued.exception(WAIT_S).code() == grpc.StatusCode.UNAVAILABLE
    probe.release.set()
    assert running.result() == b"done"
    stopper.join(WAIT_S)
    assert not stopper.is_alive()


def test_requests_are_counted_per_stage_method_and_code(start):
    import prometheus_client
    _, client = start()

    def count(code: str) -> float:
        labels = {"stage": STAGE, "method": f"/{SERVICE}/Echo", "code": code}
        return prometheus_client.REGISTRY.get_sample_value("sdxl_requests_total", labels) or 0.0

    before_ok, before_bad = count("OK"), count("INVALID_ARGUMENT")
    client.unary("Echo")(b"x", timeout=WAIT_S)
    _code(lambda: client.unary("Echo")(b"value", timeout=WAIT_S))
    assert (count("OK"), count("INVALID_ARGUMENT")) == (before_ok + 1, before_bad + 1)


def test_health_checks_are_not_logged_per_request(start, caplog):
    caplog.set_level(logging.INFO, logger=f"sdxl.{STAGE}")
    _, client = start()
    client.status()
    assert not _records(caplog, stage=STAGE)


_SIGTERM_SERVER = textwrap.dedent(f"""
    import sys, time, grpc
    from sdxl_services.server import Server, ServerOptions

    def slow(request, context):
        sys.stdout.write("started\\n"); sys.stdout.flush()
        time.sleep(0.5)
        return b"done"

    handler = grpc.method_handlers_generic_handler("{SERVICE}", {{
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
    }})
    server = Server("sig", [handler], ["{SERVICE}"], "127.0.0.1:0", ServerOptions(grace_s=5))
    port = server.start()
    server.set_serving()
    sys.stdout.write(f"{{port}}\\n"); sys.stdout.flush()
    server.run_until_signal()
""")


def test_sigterm_drains_in_flight_work_and_exits_zero():
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_SERVER], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        client = Client(int(proc.stdout.readline()))
        running = client.unary("Slow").future(b"", timeout=WAIT_S)
        assert proc.stdout.readline() == "started\n"
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        assert _until(lambda: client.status() == NOT_SERVING)
        assert _code(lambda: client.unary("Echo")(b"x", timeout=WAIT_S))[0] == grpc.StatusCode.UNAVAILABLE
        assert running.result() == b"done"
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - began < 3.0  # within the 5 s grace
    finally:
        proc.kill()
        proc.wait()


# --- metrics, TLS


def _sample(name: str, **labels) -> float | None:
    import prometheus_client

    return prometheus_client.REGISTRY.get_sample_value(name, labels)


def test_queue_depth_and_in_flight_gauges_follow_admission(start, probe):
    _, client = start(max_concurrency=1, max_queue=2)
    assert (_sample("sdxl_queue_depth", stage=STAGE), _sample("sdxl_inflight_requests", stage=STAGE)) == (0, 0)
    running = client.unary("Slow").future(b"", timeout=WAIT_S)
    assert probe.started.wait(WAIT_S)
    queued = [client.unary("Echo").future(b"q", timeout=WAIT_S) for _ in range(2)]
    assert _until(lambda: _sample("sdxl_queue_depth", stage=STAGE) == 2)
    assert _sample("sdxl_inflight_requests", stage=STAGE) == 1
    probe.release.set()
    assert running.result() == b"done" and [q.result() for q in queued] == [b"q", b"q"]
    assert _until(lambda: _sample("sdxl_queue_depth", stage=STAGE) == 0)
    assert _sample("sdxl_inflight_requests", stage=STAGE) == 0


def test_the_metrics_port_serves_the_stage_metrics(start):
    import urllib.request

    from sdxl_services.launch import free_port

    port = free_port()
    _, client = start(metrics_port=port)
    client.unary("Echo")(b"x", timeout=WAIT_S)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_S).read().decode()
    assert f'sdxl_requests_total{{code="OK",method="/{SERVICE}/Echo",stage="{STAGE}"}}' in text
    assert f'sdxl_queue_depth{{stage="{STAGE}"}} 0.0' in text


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, all signed by the CA; and a
    second CA that signed nothing here."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, cn in (("server", "localhost"), ("client", "sdxl-orchestrator")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt")
    return d


def _tls_status(port: int, tls=None) -> int:
    from sdxl_services.channels import stage_channel

    with stage_channel(f"127.0.0.1:{port}", 1 << 20, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=WAIT_S).status


def test_a_tls_server_answers_stage_channels_that_trust_its_ca_and_refuses_the_rest(start, pki):
    from sdxl_services.tls import ChannelTls, ServerTls

    server, _ = start(tls=ServerTls(str(pki / "server.crt"), str(pki / "server.key")))
    assert _tls_status(server.port, ChannelTls(str(pki / "ca.crt"))) == SERVING
    for tls in (None, ChannelTls(str(pki / "other-ca.crt"))):  # plaintext; a CA that did not sign it
        with pytest.raises(grpc.RpcError) as error:
            _tls_status(server.port, tls)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_with_a_client_ca_only_clients_with_a_certificate_it_signed_get_in(start, pki):
    from sdxl_services.tls import ChannelTls, ServerTls

    server, _ = start(tls=ServerTls(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt")))
    with pytest.raises(grpc.RpcError):
        _tls_status(server.port, ChannelTls(str(pki / "ca.crt")))  # no client certificate
    mtls = ChannelTls(str(pki / "ca.crt"), str(pki / "client.crt"), str(pki / "client.key"))
    assert _tls_status(server.port, mtls) == SERVING


def test_the_health_port_serves_plaintext_health_only_and_follows_the_server(start, pki):
    from sdxl_services.tls import ServerTls

    server, _ = start(serving=False, tls=ServerTls(str(pki / "server.crt"), str(pki / "server.key")), health_port=0)
    probe = Client(server.health_port)  # what the kubelet's gRPC probe does: plaintext Check
    assert probe.status() == NOT_SERVING
    server.set_serving()
    assert probe.status() == SERVING
    code, _ = _code(lambda: probe.unary("Echo")(b"x", timeout=WAIT_S))
    assert code == grpc.StatusCode.UNIMPLEMENTED  # the stage's own services are not on it
    server.stop(0)
    with pytest.raises(grpc.RpcError):
        probe.status()
    probe.channel.close()


def test_unreadable_tls_files_are_named(pki):
    from sdxl_services.tls import ServerTls

    with pytest.raises(ValueError, match="missing.crt"):
        ServerTls(str(pki / "missing.crt"), str(pki / "server.key")).credentials()
    with pytest.raises(ValueError, match="not a PEM file"):
        ServerTls(str(pki / "san.ext"), str(pki / "server.key")).credentials()


def test_on_stop_runs_once_the_server_has_stopped():
    stopped = []
    server = Server(STAGE, [], [SERVICE], "127.0.0.1:0", on_stop=lambda: stopped.append(server.port))
    server.start()
    assert stopped == []
    server.stop(0)
    assert stopped == [server.port]
