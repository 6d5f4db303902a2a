"""Stage processes killed with SIGKILL on the tiny model: `python -m bench.faults`.

Prints how many of N in-flight requests complete across the kill of one of two base replicas, how fast a request
fails once the only VAE is gone, and how long `sdxl serve --all` takes to have a killed replica SERVING again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from sdxl_client import SDXLClient
from sdxl_services import launch

N = 8
REQUEST = dict(height=64, width=64, num_inference_steps=40, seed=7, scheduler="euler", watermark=False)
PROMPT = "a red cube on a table"
START_S = 300


def _stages() -> dict[str, launch.Child]:
    children = {name: launch.spawn(stage, ["--address", address], address, name=name)
                for name, stage, address in [(n, s, f"127.0.0.1:{launch.free_port()}") for n, s in
                                             (("text_encoder", "text_encoder"), ("base-0", "base"),
                                              ("base-1", "base"), ("vae", "vae"))]}
    for child in children.values():
        launch.wait_ready(child, time.monotonic() + START_S)
    address = f"127.0.0.1:{launch.free_port()}"
    children["orchestrator"] = launch.spawn("orchestrator", [
        "--text-encoder", children["text_encoder"].address, "--vae", children["vae"].address,
        "--base", f"{children['base-0'].address},{children['base-1'].address}", "--address", address], address)
    launch.wait_ready(children["orchestrator"], time.monotonic() + START_S)
    return children


def replica_kill(client: SDXLClient, children: dict[str, launch.Child]) -> Counter:
    """N requests at once, base-0 killed once every one is denoising; their outcomes by status code."""
    denoising, outcomes = threading.Semaphore(0), Counter()

    def generate() -> None:
        started = []

        def progress(stage, step, total):
            if stage == "base" and not started:
                started.append(denoising.release())
        try:
            client.generate(PROMPT, on_progress=progress, **REQUEST)
            outcomes["OK"] += 1
        except grpc.RpcError as error:
            outcomes[error.code().name] += 1

    threads = [threading.Thread(target=generate) for _ in range(N)]
    for thread in threads:
        thread.start()
    for _ in range(N):
        denoising.acquire(timeout=START_S)
    os.kill(children["base-0"].process.pid, signal.SIGKILL)
    for thread in threads:
        thread.join()
    return outcomes


def lost_vae(client: SDXLClient, children: dict[str, launch.Child]) -> tuple[str, float]:
    """(status, seconds from the kill to the client's error) of a request whose only VAE is killed at decode."""
    killed = []

    def progress(stage, step, total):
        if stage == "decode" and not killed:
            os.kill(children["vae"].process.pid, signal.SIGKILL)
            killed.append(time.monotonic())
    try:
        client.generate(PROMPT, on_progress=progress, **REQUEST)
        return "OK", time.monotonic() - killed[0]
    except grpc.RpcError as error:
        return f"{error.code().name} ({error.details()[:60]})", time.monotonic() - killed[0]


def supervised_restart() -> float:
    """Seconds from the kill of base-1 under `sdxl serve --all` to the launcher's "SERVING again"."""
    port = launch.free_port()
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "serve.log"
        with open(log, "w") as out:
            serve = subprocess.Popen([sys.executable, "-m", "sdxl_client", "serve", "--all", "--no-refiner",
                                      "--base-device", "cpu+cpu", "--host", "127.0.0.1", "--port", str(port)],
                                     stdout=out, stderr=subprocess.STDOUT)
        try:
            text = _wait(log, "serving on")
            address = re.search(r"base-1\s+(\S+)", text).group(1)
            pid = next(int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                       if _reads(p) and address.encode() in _reads(p).split(b"\0") and p.parent.name != str(serve.pid))
            os.kill(pid, signal.SIGKILL)
            return float(re.search(r"base-1 is SERVING again, ([\d.]+) s", _wait(log, "SERVING again")).group(1))
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(90)


def _reads(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _wait(log: Path, text: str) -> str:
    deadline = time.monotonic() + START_S
    while text not in (content := log.read_text()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {text!r} in:\n{content[-2000:]}")
        time.sleep(0.2)
    return content


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    children = _stages()
    try:
        with SDXLClient(children["orchestrator"].address, timeout=120) as client:
            client.generate(PROMPT, **REQUEST)  # warm up
            outcomes = replica_kill(client, children)
            print(f"base replica killed with {N} requests in flight: "
                  + ", ".join(f"{count} {code}" for code, count in sorted(outcomes.items())))
            status, seconds = lost_vae(client, children)
            print(f"only VAE killed at decode: {status} {seconds:.2f} s after the kill")
    finally:
        launch.stop(list(children.values()), grace_s=10)
    print(f"supervised base replica killed: SERVING again {supervised_restart():.1f} s later")


if __name__ == "__main__":
    main()
