import subprocess
import sys
import time

import pytest

from sdxl_services import launch


def test_stage_args_route_models_and_devices():
    options = launch.ServeOptions(base_model="/m/base", refiner_model="/m/refiner", device="cuda:0",
                                  refiner_device="cuda:1", dtype="float16")
    processes = {p.name: p for p in options.processes(gpus=2)}
    assert launch.ServeOptions().stage_args(launch.ServeOptions().processes(gpus=0)[1]) == \
        ["--device", "cpu", "--dtype", "float32"]
    assert options.stage_args(processes["base"]) == ["--model", "/m/base", "--device", "cuda:0", "--dtype", "float16"]
    assert options.stage_args(processes["refiner"]) == \
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
    from sdxl_services.stage import parse_args

    parsed = parse_args(["orchestrator", *args])
    assert (parsed.text_encoder, parsed.base, parsed.vae) == tuple(addresses.values())
