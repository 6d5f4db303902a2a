"""bench.engine's smallest configurations: its parts run and count what they should (no timing is checked)."""

from __future__ import annotations

import math

import prometheus_client
import pytest
import torch

from bench import engine
from sdxl_core.configs import TINY_BASE_UNET
from sdxl_services.stage import parse_args


def test_a_class_counts_refusals_apart_from_other_errors_and_rates_images_over_its_span():
    outcomes = [engine.Outcome("preview", ended=2.0, latency=1.0, images=1),
                engine.Outcome("preview", ended=4.0, latency=3.0, images=1),
                engine.Outcome("preview", ended=5.0, latency=0.1, code="RESOURCE_EXHAUSTED"),
                engine.Outcome("preview", ended=6.0, latency=0.1, code="UNAVAILABLE"),
                engine.Outcome("full", ended=9.0, latency=9.0, images=1)]
    stats = engine.ClassStats.of("preview", outcomes)
    assert (stats.done, stats.p50, stats.images_per_s, stats.refused) == (2, 2.0, 0.5, 1)
    assert engine.other_errors(stats.failed) == "UNAVAILABLE 1"


def test_queue_waits_are_read_from_a_metrics_page_and_taken_over_the_window():
    registry = prometheus_client.CollectorRegistry()
    wait = prometheus_client.Histogram(engine.QUEUE_WAIT.removesuffix("_seconds"), "wait", ["stage"], unit="seconds",
                                       registry=registry, buckets=(0.1, 1, 10))
    wait.labels("vae").observe(5.0)
    before = engine.queue_waits(prometheus_client.generate_latest(registry).decode())
    for seconds in (0.05, 0.5, 0.5, 20.0):
        wait.labels("vae").observe(seconds)
    window = engine.queue_waits(prometheus_client.generate_latest(registry).decode())["vae"] - before["vae"]
    assert (window.count, window.total) == (4, 21.05)
    assert dict(window.buckets) == {0.1: 1, 1.0: 3, 10.0: 3, math.inf: 4}
    assert window.quantile(0.5) == pytest.approx(0.55)  # rank 2: halfway through the (0.1, 1] bucket's two
    assert window.quantile(0.95) == 10.0  # past the highest finite bound: that bound
    assert math.isnan(engine.WaitHistogram().mean)


def test_the_bench_configurations_reach_the_stage_processes_with_a_metrics_port_each(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for config in engine.traffic_configs(engine.parser().parse_args(["--vae-tile", "512"])):
        options = engine.cluster_options(config, None)
        parsed = {p.name: parse_args([p.stage, *options.stage_args(p)]) for p in options.processes(gpus=0, cores=2)}
        assert sorted(parsed) == sorted(engine.WAIT_STAGES)
        assert {a.metrics_port for a in parsed.values()} == set(options.metrics_ports.values())
        assert len(options.metrics_ports) == 4
        assert {a.policy for a in parsed.values()} == {config.policy}
        assert (parsed["vae"].vae_whole_pixels, parsed["vae"].vae_tile) == (config.vae_whole_pixels, config.vae_tile)


@pytest.fixture(scope="module")
def tiny_unet():
    return engine.random_unet(TINY_BASE_UNET)


def test_the_tiny_curve_at_256_measures_each_row_count_and_picks_one_of_them(tiny_unet):
    curve = engine.measure_curve("tiny", tiny_unet, TINY_BASE_UNET, latent=32, max_rows=4, budget_s=60)
    assert list(curve.per_row) == [1, 2, 4] and curve.budget in (2, 4) and not curve.cut


def test_a_curve_past_its_budget_stops_and_says_so(tiny_unet):
    curve = engine.measure_curve("tiny", tiny_unet, TINY_BASE_UNET, latent=32, max_rows=4, budget_s=0)
    assert (curve.per_row, curve.budget) == ({}, None)
    assert curve.cut.startswith("rows >= 1 skipped")


@pytest.mark.parametrize("policy", ["fifo", "batch"])
def test_concurrent_denoise_calls_through_the_stage_all_return_latents(tiny_unet, policy):
    run = engine.serving_run(tiny_unet, policy, requests=3, size=64, steps=2)
    assert (run.images, run.peak_bytes) == (3, None)


@pytest.fixture
def own_orchestrator(tiny_model_dir):
    """Stages of their own: concurrent traffic shares forwards, which moves results by float noise, so it stays
    away from the session's stages that the parity tests compare pixel for pixel."""
    from sdxl_services import denoiser, orchestrator, text_encoder, vae

    stages = [text_encoder.build(tiny_model_dir / "base", tiny_model_dir / "refiner"),
              denoiser.build(tiny_model_dir / "base"), denoiser.build(tiny_model_dir / "refiner"),
              vae.build(tiny_model_dir / "base")]
    front = orchestrator.build(*(f"127.0.0.1:{s.port}" for s in stages))
    yield f"127.0.0.1:{front.port}"
    for server in (front, *stages):
        server.stop(0)


def test_the_closed_loop_sends_both_classes_through_the_client(own_orchestrator):
    kinds = [engine.RequestClass("preview", 64, 2, priority="interactive"),
             engine.RequestClass("full", 64, 4, refiner="ensemble")]
    outcomes = engine.closed_loop(own_orchestrator, kinds, seconds=1.0)
    for kind in kinds:
        stats = engine.ClassStats.of(kind.name, outcomes)
        assert stats.done >= 1 and not stats.failed


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the GPU section on a GPU")
def test_the_gpu_section_says_it_is_skipped_without_one(capsys):
    engine.main(["--only", "gpu"])
    assert "skipped: no GPU" in capsys.readouterr().out
