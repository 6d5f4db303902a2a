"""Stage processes killed with SIGKILL mid-request (tiny model, loopback): the orchestrator runs the lost call
again on another replica with the same image, fails fast naming the stage when none is left, and `sdxl serve
--all` restarts what died.

The launcher test runs first and alone; then one hand-started cluster (text encoder, two base replicas, VAE,
orchestrator) serves the rest in order: a base replica is killed, then the only VAE, which is started again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from sdxl_client import SDXLClient
from sdxl_services import launch

START_S = 180
TIMEOUT_S = 120
REQUEST = dict(height=64, width=64, num_inference_steps=80, seed=7, scheduler="euler", watermark=False)
PROMPT = "a red cube on a table"


@pytest.fixture(scope="module")
def env(tiny_model_dir):
    """The children's environment: one torch thread each, the tiny model as the default."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("SDXL_MODEL_DIR", str(tiny_model_dir))
        yield {**os.environ}


def _pid_listening_on(parent: int, address: str) -> int:
    """The child of `parent` started with `--address ADDRESS`."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            ppid = int((cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        if ppid == parent and address.encode() in argv:
            return int(cmdline.parent.name)
    raise AssertionError(f"no child of {parent} listens on {address}")


def _wait_for(log: Path, pattern: str, process: subprocess.Popen, timeout: float = START_S) -> re.Match:
    deadline = time.monotonic() + timeout
    while not (match := re.search(pattern, log.read_text())):
        assert process.poll() is None, f"serve --all exited with {process.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    return match


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads child processes from /proc")
def test_serve_all_restarts_a_killed_replica_and_keeps_serving(env, tmp_path):
    port = launch.free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as log_file:
        serve = subprocess.Popen(
            [sys.executable, "-m", "sdxl_client", "serve", "--all", "--no-refiner", "--base-device", "cpu+cpu",
             "--host", "127.0.0.1", "--port", str(port)], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(log, "serving on", serve)
        address = _wait_for(log, r"base-1\s+(\S+)", serve).group(1)
        victim = _pid_listening_on(serve.pid, address)
        os.kill(victim, signal.SIGKILL)
        _wait_for(log, "base-1 is SERVING again", serve, timeout=60)
        assert _pid_listening_on(serve.pid, address) != victim
        with SDXLClient(f"127.0.0.1:{port}", timeout=TIMEOUT_S) as client:
            for _ in range(3):  # round robin: both replicas serve
                assert len(client.generate(PROMPT, **REQUEST | dict(num_inference_steps=2)).images) == 1
        assert serve.poll() is None
        assert "restarting base-1 on " + address in log.read_text()
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(90)
    assert code == 0, log.read_text()[-4000:]


class Stages:
    """Stage processes started by hand, so that the test can kill and replace them."""

    def __init__(self):
        self.children: dict[str, launch.Child] = {}

    def start(self, name: str, stage: str, *args: str, address: str | None = None) -> launch.Child:
        address = address or f"127.0.0.1:{launch.free_port()}"
        self.children[name] = launch.spawn(stage, [*args, "--address", address], address, name=name)
        return self.children[name]

    def stop(self) -> None:
        launch.stop(list(self.children.values()), grace_s=10)


@pytest.fixture(scope="module")
def cluster(env):
    stages = Stages()
    try:
        # fifo: one request at a time, so the retried one is not batched with the other (float sums differ)
        for name, stage, *args in (("text_encoder", "text_encoder"), ("base-0", "base", "--policy", "fifo"),
                                   ("base-1", "base", "--policy", "fifo"), ("vae", "vae")):
            stages.start(name, stage, *args)
        for child in stages.children.values():
            launch.wait_ready(child, time.monotonic() + START_S)
        c = stages.children
        orchestrator = stages.start("orchestrator", "orchestrator", "--text-encoder", c["text_encoder"].address,
                                    "--base", f"{c['base-0'].address},{c['base-1'].address}",
                                    "--vae", c["vae"].address)
        launch.wait_ready(orchestrator, time.monotonic() + START_S)
        yield stages
    finally:
        stages.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with SDXLClient(cluster.children["orchestrator"].address, timeout=TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="module")
def unharmed(client):
    """The request's image from the cluster before anything was killed."""
    return np.array(client.generate(PROMPT, **REQUEST).images[0])


def _busiest(*children: launch.Child) -> int:
    """The pid of the child that spends the most CPU time over the next 0.2 s."""
    def cpu() -> list[int]:
        return [sum(map(int, Path(f"/proc/{c.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]))
                for c in children]
    before = cpu()
    time.sleep(0.2)
    spent = [after - was for after, was in zip(cpu(), before)]
    return children[spent.index(max(spent))].process.pid


def test_a_base_replica_killed_mid_denoise_is_replaced_by_the_other_with_the_same_image(cluster, client, unharmed):
    denoising, results, steps = threading.Event(), {}, {0: [], 1: []}

    def generate(i: int) -> None:
        def progress(stage, step, total):
            if stage == "base":
                steps[i].append(step)
                if step >= 1:
                    denoising.set()
        try:
            results[i] = client.generate(PROMPT, on_progress=progress, **REQUEST)
        except grpc.RpcError as error:
            results[i] = error

    # Two at once, most likely one on each replica; the busier replica is killed, mid-denoise.
    threads = [threading.Thread(target=generate, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    assert denoising.wait(TIMEOUT_S)
    os.kill(_busiest(cluster.children["base-0"], cluster.children["base-1"]), signal.SIGKILL)
    for thread in threads:
        thread.join(TIMEOUT_S)
    for i in (0, 1):
        assert not isinstance(results[i], grpc.RpcError), results[i]
        got = np.array(results[i].images[0])
        assert np.array_equal(got, unharmed), (i, np.abs(got.astype(int) - unharmed).max(), steps)
    restarted = [s for s in steps.values() if any(b <= a for a, b in zip(s, s[1:]))]
    assert restarted, steps  # the killed replica's request saw its progress start again


def test_the_only_vae_killed_mid_decode_fails_fast_naming_it_and_a_replacement_serves(cluster, client, unharmed):
    vae = cluster.children["vae"]
    killed: list[float] = []

    def progress(stage, step, total):
        if stage == "decode" and step == 0 and not killed:
            os.kill(vae.process.pid, signal.SIGKILL)
            killed.append(time.monotonic())

    with pytest.raises(grpc.RpcError) as failed:
        client.generate(PROMPT, on_progress=progress, **REQUEST)
    elapsed = time.monotonic() - killed[0]
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    assert failed.value.details().startswith("vae stage:"), failed.value.details()
    assert elapsed < 5.0

    replacement = cluster.start("vae", "vae", address=vae.address)
    launch.wait_ready(replacement, time.monotonic() + START_S)
    assert np.array_equal(np.array(client.generate(PROMPT, **REQUEST).images[0]), unharmed)
