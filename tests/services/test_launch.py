import re
import subprocess
import sys
import time

import pytest

from sdxl_services import launch
from sdxl_services.stage import parse_args


def test_stage_args_route_models_and_devices():
    options = launch.ServeOptions(base_model="/m/base", refiner_model="/m/refiner", device="cuda:0",
                                  refiner_device="cuda:1", dtype="float16")
    processes = {p.name: p for p in options.processes(gpus=2)}
    assert launch.ServeOptions().stage_args(launch.ServeOptions().processes(gpus=0)[1])[:4] == \
        ["--device", "cpu", "--dtype", "float32"]
    assert options.stage_args(processes["base"])[:6] == \
        ["--model", "/m/base", "--device", "cuda:0", "--dtype", "float16"]
    assert options.stage_args(processes["refiner"])[:6] == \
        ["--model", "/m/refiner", "--device", "cuda:1", "--dtype", "float16"]
    assert options.stage_args(processes["text_encoder"])[:4] == ["--model", "/m/base", "--refiner-model", "/m/refiner"]


def test_a_child_that_dies_at_start_fails_with_its_output_tail():
    process = subprocess.Popen([sys.executable, "-c", "import sys; print('weights missing: /nope'); sys.exit(3)"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    child = launch.Child("base", "127.0.0.1:1", process)
    launch._pump(child, None)
    process.wait()
    with pytest.raises(launch.LaunchError, match=r"(?s)base exited before listening \(exit status 3\).*weights missing"):
        launch.wait_ready(child, time.monotonic() + 5)


def test_stop_terminates_and_then_kills_after_the_grace():
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
               "time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True)
    process.stdout.readline()
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    codes = launch.stop([launch.Child("vae", "", process), launch.Child("orchestrator", "", polite)], grace_s=0.5)
    assert codes == {"vae": -9, "orchestrator": -15}


def test_a_real_base_model_needs_a_real_refiner_model():
    with pytest.raises(ValueError, match="--refiner-model"):
        launch.ServeOptions(base_model="/m/base")
    launch.ServeOptions(base_model="/m/base", no_refiner=True)


def test_orchestrator_gets_every_stage_address_and_nothing_it_can_ask_the_stages():
    options = launch.ServeOptions(dtype="float16", no_refiner=True)
    processes = options.processes(gpus=0)
    addresses = {"text_encoder": "127.0.0.1:1", "base": "127.0.0.1:2", "vae": "127.0.0.1:3"}
    args = options.orchestrator_args(processes, addresses)
    assert args == ["--text-encoder", "127.0.0.1:1", "--base", "127.0.0.1:2", "--vae", "127.0.0.1:3"]
    parsed = parse_args(["orchestrator", *args])
    assert (parsed.text_encoder, parsed.base, parsed.vae) == tuple(addresses.values())


def test_serve_all_flags_reach_the_stage_processes_as_they_parse_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = launch.parser().parse_args(["--all", "--threads", "vae=2", "--policy", "fifo", "--max-batch-rows", "8"])
    options = launch.serve_options(args)
    parsed = {p.name: parse_args([p.stage, *options.stage_args(p), "--address", "127.0.0.1:0"])
              for p in options.processes(gpus=0, cores=16)}
    assert {name: a.threads for name, a in parsed.items()} == {"text_encoder": 1, "base": 10, "refiner": 3, "vae": 2}
    assert {name: (a.policy, a.max_batch_rows) for name, a in parsed.items()} == \
        {"text_encoder": ("fifo", None), "base": ("fifo", 8), "refiner": ("fifo", 8), "vae": ("fifo", None)}


def test_every_stage_gets_the_policy_the_denoisers_the_row_budget_and_only_when_given(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    options = launch.ServeOptions(policy="batch", max_batch_rows=4)
    args = {p.name: options.stage_args(p) for p in options.processes(gpus=0, cores=2)}
    assert args["base"][-4:] == ["--policy", "batch", "--max-batch-rows", "4"]
    assert args["refiner"][-4:] == ["--policy", "batch", "--max-batch-rows", "4"]
    assert args["text_encoder"] == args["vae"] == ["--device", "cpu", "--dtype", "float32", "--threads", "1",
                                                   "--policy", "batch"]
    defaults = launch.ServeOptions()
    assert all("--policy" not in defaults.stage_args(p) and "--max-batch-rows" not in defaults.stage_args(p)
               for p in defaults.processes(gpus=0, cores=2))


@pytest.mark.parametrize("options, message", [
    ({"policy": "lifo"}, "--policy must be one of batch, fifo"),
    ({"max_batch_rows": 0}, "--max-batch-rows must be >= 1"),
    ({"threads": "base=0"}, "is not STAGE=N"),
])
def test_bad_engine_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        launch.ServeOptions(**options)


def test_the_vae_flags_reach_the_vae_process_alone_and_only_when_given(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = launch.parser().parse_args(["--all", "--vae-tile", "512", "--vae-whole-pixels", str(1024 * 1024)])
    options = launch.serve_options(args)
    parsed = {p.name: parse_args([p.stage, *options.stage_args(p), "--address", "127.0.0.1:0"])
              for p in options.processes(gpus=0, cores=4)}
    assert {name: (a.vae_tile, a.vae_whole_pixels) for name, a in parsed.items()} == {
        "text_encoder": (None, None), "base": (None, None), "refiner": (None, None), "vae": (512, 1024 * 1024)}
    defaults = launch.serve_options(launch.parser().parse_args(["--all"]))
    assert all(not {"--vae-tile", "--vae-whole-pixels"} & set(defaults.stage_args(p))
               for p in defaults.processes(gpus=0, cores=4))
    with pytest.raises(ValueError, match="--vae-tile must be >= 1"):
        launch.ServeOptions(vae_tile=0)


class _DyingCluster:
    """A Cluster whose one process exits at once, every time it is started."""

    options = launch.ServeOptions(start_timeout_s=5)

    def __init__(self):
        self.children, self.starts = [self._start()], 1

    @staticmethod
    def _start() -> launch.Child:
        process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], stdout=subprocess.PIPE, text=True)
        return launch.Child("base-1", "127.0.0.1:1", process, stage="base", args=("--device", "cpu"))

    def respawn(self, child):
        assert (child.stage, child.args, child.address) == ("base", ("--device", "cpu"), "127.0.0.1:1")
        self.children[0], self.starts = self._start(), self.starts + 1
        return self.children[0]


def test_a_dead_process_is_restarted_with_backoff_until_it_dies_too_often():
    import io
    import threading

    cluster, log = _DyingCluster(), io.StringIO()
    policy = launch.Supervision(backoff_s=0.1, max_backoff_s=0.2, max_deaths=4, window_s=60)
    supervisor = launch.Supervisor(cluster, policy, threading.Event(), log)
    started, gave_up = time.monotonic(), None
    while gave_up is None and time.monotonic() - started < 20:
        gave_up = supervisor.check()
        time.sleep(0.02)
    assert gave_up is cluster.children[0] and cluster.starts == 4
    assert time.monotonic() - started >= 0.1 + 0.2 + 0.2  # the backoff doubles up to its cap
    assert [float(s) for s in re.findall(r"restarting it in ([\d.]+) s", log.getvalue())] == [0.1, 0.2, 0.2]
    assert log.getvalue().count("restarting base-1 on 127.0.0.1:1") == 3
