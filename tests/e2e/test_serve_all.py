"""`sdxl serve --all` as a real process tree on the tiny model: health, one ensemble generate, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sdxl_client import SDXLClient
from sdxl_services.launch import free_port

START_TIMEOUT_S = 300


def _children(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_serving(address: str, process: subprocess.Popen, log: Path) -> None:
    """Wait for serve --all's "serving on" line (every stage is SERVING), then check the orchestrator's health."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while "serving on" not in log.read_text():
        assert process.poll() is None, f"serve --all exited with {process.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"not serving after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)
    with SDXLClient(address) as client:
        assert client.health() == "SERVING"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads child processes from /proc")
def test_serve_all_generates_with_the_ensemble_refiner_and_stops_every_child(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "SDXL_MODEL_DIR": str(tiny_model_dir)}
    log = tmp_path / "serve.log"
    with open(log, "w") as log_file:
        serve = subprocess.Popen(
            [sys.executable, "-m", "sdxl_client", "serve", "--all", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
    try:
        _wait_serving(f"127.0.0.1:{port}", serve, log)
        children = _children(serve.pid)
        assert len(children) == 5, log.read_text()[-4000:]
        out = tmp_path / "out.png"
        generate = subprocess.run(
            [sys.executable, "-m", "sdxl_client", "generate", "an astronaut riding a horse", "--address",
             f"127.0.0.1:{port}", "--refiner", "ensemble", "--high-noise-frac", "0.8", "--steps", "4", "--seed", "0",
             "--size", "96x64", "-o", str(out), "--timeout", "300"],
            capture_output=True, text=True, env=env, timeout=360, check=False,
        )
        assert generate.returncode == 0, generate.stderr + log.read_text()[-4000:]
        assert Image.open(out).size == (96, 64)
        assert "refiner" in generate.stderr  # the refiner stage's progress bar
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(90)
    assert code == 0, log.read_text()[-4000:]
    assert [pid for pid in children if _alive(pid)] == []
