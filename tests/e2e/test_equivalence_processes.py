"""Real stage processes on loopback give the in-process pipelines' exact pixels (tiny model, watermark off).

One cluster of five processes (services/launch.py's Cluster) for the module, every stage told the very
model folders the pipelines here load (--model / --refiner-model), so the weights are the same bytes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from sdxl_client import SDXLClient
from sdxl_core.pipelines import SDXLImg2ImgPipeline, SDXLPipeline
from sdxl_services.launch import Cluster, ServeOptions

PROMPT = "a red cube on a table"
SEED = 4321
SIZE = 64
TIMEOUT_S = 120


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    options = ServeOptions(
        base_model=str(tiny_model_dir / "base"), refiner_model=str(tiny_model_dir / "refiner"),
        host="127.0.0.1", port=0, start_timeout_s=180, grace_s=30,  # a loaded CI machine exits slowly
        device="cpu",  # the in-process side computes on the CPU in float32; a GPU host would default to fp16
    )
    # The children inherit the environment: one torch thread each, and the same model folder as a default.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("SDXL_MODEL_DIR", str(tiny_model_dir))
        running = Cluster(options)
        running.start()
    try:
        yield running
    finally:
        codes = running.stop()
    assert all(code == 0 for code in codes.values()), codes


@pytest.fixture(scope="module")
def client(cluster):
    with SDXLClient(cluster.address, timeout=TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="module")
def pipelines(tiny_model_dir):
    base = SDXLPipeline.from_pretrained(tiny_model_dir / "base", add_watermarker=False)
    refiner = SDXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "refiner", add_watermarker=False)
    return base, refiner


def test_every_stage_is_its_own_process(cluster, client):
    assert client.health() == "SERVING"
    pids = {child.name: child.process.pid for child in cluster.children}
    assert sorted(pids) == ["base", "orchestrator", "refiner", "text_encoder", "vae"]
    assert len(set(pids.values())) == 5 and os.getpid() not in pids.values()


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "euler_a"])
def test_ensemble_at_0_8_equals_base_then_refiner_pipelines(client, pipelines, scheduler):
    base, refiner = pipelines
    steps: dict[str, int] = {}
    result = client.generate(PROMPT, height=SIZE, width=SIZE, num_inference_steps=5, seed=SEED, scheduler=scheduler,
                             refiner="ensemble", high_noise_frac=0.8, watermark=False,
                             on_progress=lambda stage, step, total: steps.__setitem__(stage, total))
    latents = base(PROMPT, height=SIZE, width=SIZE, num_inference_steps=5, seed=SEED, scheduler=scheduler,
                   denoising_end=0.8, output_type="latent").images
    want = refiner(PROMPT, image=latents, num_inference_steps=5, seed=SEED, scheduler=scheduler,
                   denoising_start=0.8).images
    assert steps["base"] >= 1 and steps["refiner"] >= 1, steps  # both stages ran
    assert result.seed == SEED and len(result.images) == 1
    got, expected = np.array(result.images[0]), np.array(want[0])
    assert got.dtype == expected.dtype == np.uint8 and got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.array_equal(got, expected), f"max abs diff {np.abs(got.astype(int) - expected.astype(int)).max()}"


def test_text2img_without_refiner_equals_the_pipeline(client, pipelines):
    base, _ = pipelines
    result = client.generate(PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, seed=SEED, scheduler="euler",
                             watermark=False)
    want = base(PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, seed=SEED, scheduler="euler").images
    got, expected = np.array(result.images[0]), np.array(want[0])
    assert got.dtype == expected.dtype == np.uint8 and got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.array_equal(got, expected), f"max abs diff {np.abs(got.astype(int) - expected.astype(int)).max()}"
