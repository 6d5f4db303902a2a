"""Where `sdxl serve --all` places its stage processes: the default spread over the visible GPUs, the
--placement option, the per-stage flags over both, the dtypes, and what the orchestrator is told."""

from __future__ import annotations

import pytest
import torch

from sdxl_client.cli import main
from sdxl_services import launch
from sdxl_services.stage import parse_args

UNETS = ("base", "refiner")


def processes_with(monkeypatch, gpus: int, **options) -> list[launch.StageProcess]:
    """The processes a Cluster would start on a host where torch sees `gpus` GPUs (nothing is started)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    return launch.Cluster(launch.ServeOptions(port=0, **options)).processes


def placed(processes: list[launch.StageProcess]) -> dict[str, tuple[str, str]]:
    return {p.name: (p.device, p.dtype) for p in processes}


def orchestrator(options: launch.ServeOptions, processes: list[launch.StageProcess]):
    """The orchestrator's args for these processes, as the orchestrator process parses them."""
    addresses = {p.name: f"127.0.0.1:{1000 + i}" for i, p in enumerate(processes)}
    return parse_args(["orchestrator", *options.orchestrator_args(processes, addresses)]), addresses


def test_without_a_gpu_every_stage_runs_once_on_the_cpu_in_float32(monkeypatch):
    assert placed(processes_with(monkeypatch, 0)) == {
        "text_encoder": ("cpu", "float32"), "base": ("cpu", "float32"), "refiner": ("cpu", "float32"),
        "vae": ("cpu", "float32")}


def test_one_gpu_holds_every_stage_in_half_precision_but_the_vae(monkeypatch):
    assert placed(processes_with(monkeypatch, 1)) == {
        "text_encoder": ("cuda:0", "float16"), "base": ("cuda:0", "float16"), "refiner": ("cuda:0", "float16"),
        "vae": ("cuda:0", "float32")}


def test_two_gpus_give_the_base_its_own_gpu_and_the_rest_share_the_other(monkeypatch):
    assert placed(processes_with(monkeypatch, 2)) == {
        "text_encoder": ("cuda:1", "float16"), "base": ("cuda:0", "float16"), "refiner": ("cuda:1", "float16"),
        "vae": ("cuda:1", "float32")}


def test_four_gpus_run_three_base_replicas_and_the_rest_on_the_last_gpu(monkeypatch):
    processes = processes_with(monkeypatch, 4)
    assert {p.name: p.device for p in processes} == {
        "text_encoder": "cuda:3", "base-0": "cuda:0", "base-1": "cuda:1", "base-2": "cuda:2", "refiner": "cuda:3",
        "vae": "cuda:3"}


def test_eight_gpus_run_six_base_replicas_and_two_refiners_that_host_the_light_stages(monkeypatch):
    processes = processes_with(monkeypatch, 8)
    assert {p.name: p.device for p in processes} == {
        "text_encoder": "cuda:6", **{f"base-{i}": f"cuda:{i}" for i in range(6)}, "refiner-0": "cuda:6",
        "refiner-1": "cuda:7", "vae": "cuda:7"}


@pytest.mark.parametrize("gpus", range(2, 17))
def test_every_gpu_runs_exactly_one_unet_and_most_run_the_base(monkeypatch, gpus):
    processes = processes_with(monkeypatch, gpus)
    unet_devices = sorted((p.device for p in processes if p.stage in UNETS), key=lambda d: int(d.split(":")[1]))
    assert unet_devices == [f"cuda:{i}" for i in range(gpus)]
    refiners = sum(p.stage == "refiner" for p in processes)
    assert 1 <= refiners <= gpus - refiners
    light = {p.device for p in processes if p.stage in ("text_encoder", "vae")}
    assert light <= {p.device for p in processes if p.stage == "refiner"}  # never beside a base replica
    fewer = sum(p.stage == "refiner" for p in processes_with(monkeypatch, gpus - 1)) if gpus > 2 else 1
    assert fewer <= refiners  # a GPU more never takes a refiner away


def test_without_a_refiner_every_gpu_runs_a_base_replica(monkeypatch):
    processes = processes_with(monkeypatch, 2, no_refiner=True)
    assert placed(processes) == {
        "text_encoder": ("cuda:1", "float16"), "base-0": ("cuda:0", "float16"), "base-1": ("cuda:1", "float16"),
        "vae": ("cuda:1", "float32")}


def test_placement_option_overrides_the_default_and_the_stage_flags_override_both(monkeypatch):
    processes = processes_with(monkeypatch, 4, placement="base=cuda:0+cuda:1, refiner=cuda:2,text-encoder=cuda:3",
                               refiner_device="cuda:3", device="cuda:1")
    assert {p.name: p.device for p in processes} == {
        "text_encoder": "cuda:3", "base-0": "cuda:0", "base-1": "cuda:1", "refiner": "cuda:3",
        "vae": "cuda:1"}  # vae: not placed, so --device


def test_device_and_stage_flags_override_the_default_spread(monkeypatch):
    assert {p.device for p in processes_with(monkeypatch, 8, device="cpu")} == {"cpu"}
    processes = processes_with(monkeypatch, 2, base_device="cuda:1", vae_device="cpu")
    assert placed(processes) == {
        "text_encoder": ("cuda:1", "float16"), "base": ("cuda:1", "float16"), "refiner": ("cuda:1", "float16"),
        "vae": ("cpu", "float32")}


def test_dtype_flags_override_the_per_device_default(monkeypatch):
    everything = processes_with(monkeypatch, 1, dtype="bfloat16")
    assert {p.dtype for p in everything} == {"bfloat16"}  # the VAE too: it upcasts itself where it must
    fp16_fix_vae = processes_with(monkeypatch, 1, vae_dtype="float16", base_dtype="bfloat16", dtype="float32")
    assert {p.stage: p.dtype for p in fp16_fix_vae} == {
        "text_encoder": "float32", "base": "bfloat16", "refiner": "float32", "vae": "float16"}


@pytest.mark.parametrize("gpus", [0, 1, 2, 4, 8])
def test_the_orchestrator_gets_every_replica(monkeypatch, gpus):
    processes = processes_with(monkeypatch, gpus)
    options = launch.ServeOptions()
    args, addresses = orchestrator(options, processes)
    for stage in launch.STAGES:
        replicas = [addresses[p.name] for p in processes if p.stage == stage]
        assert getattr(args, stage).split(",") == replicas


def test_stage_processes_get_their_own_device_and_dtype(monkeypatch):
    options = launch.ServeOptions(base_model="/m/base", refiner_model="/m/refiner")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for process in launch.Cluster(options).processes:
        args = parse_args([process.stage, *options.stage_args(process), "--address", "127.0.0.1:0"])
        assert (args.device, args.dtype) == (process.device, process.dtype)
        assert args.model == ("/m/refiner" if process.stage == "refiner" else "/m/base")


def test_base_replicas_that_would_differ_in_dtype_are_refused_until_given_one(monkeypatch):
    with pytest.raises(ValueError, match="--base-dtype"):
        processes_with(monkeypatch, 1, base_device="cpu+cuda:0")
    processes = processes_with(monkeypatch, 1, base_device="cpu+cuda:0", base_dtype="float32")
    assert [(p.name, p.device) for p in processes if p.stage == "base"] == [("base-0", "cpu"), ("base-1", "cuda:0")]


@pytest.mark.parametrize("placement, message", [
    ("unet=cuda:0", "STAGE one of"),
    ("base", "not STAGE=DEVICE"),
    ("base=gpu 0", "is not a device"),
    ("base=cuda:0,base=cuda:1", "names base twice"),
    ("vae=cuda:0+", "is not a device"),
])
def test_a_bad_placement_is_refused_naming_the_entry(placement, message):
    with pytest.raises(ValueError, match=message):
        launch.ServeOptions(placement=placement)


def test_a_gpu_torch_does_not_see_is_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"base's device is cuda:2, but torch sees 2 GPU"):
        processes_with(monkeypatch, 2, placement="base=cuda:0+cuda:2")
    with pytest.raises(ValueError, match="torch sees 0 GPU"):
        processes_with(monkeypatch, 0, device="cuda")


def test_serve_all_exits_2_on_a_bad_placement_before_starting_anything(capsys):
    assert main(["serve", "--all", "--placement", "unet=cuda:0"]) == 2
    assert "unet=cuda:0" in capsys.readouterr().err
    assert main(["serve", "--all", "--base-device", "cuda:zero"]) == 2


def test_cli_flags_reach_the_options(monkeypatch):
    args = launch.parser().parse_args(["--all", "--placement", "base=cuda:0+cuda:1,refiner=cuda:2",
                                "--vae-device", "cuda:2", "--text-encoder-dtype", "bfloat16"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    processes = launch.Cluster(launch.serve_options(args)).processes
    assert placed(processes) == {
        "text_encoder": ("cuda:2", "bfloat16"), "base-0": ("cuda:0", "float16"), "base-1": ("cuda:1", "float16"),
        "refiner": ("cuda:2", "float16"), "vae": ("cuda:2", "float32")}


# --- torch threads: the host's cores split between the processes


@pytest.fixture
def no_omp(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def threads(cores: int, gpus: int = 0, **options) -> dict[str, int | None]:
    return {p.name: p.threads for p in launch.ServeOptions(**options).processes(gpus, cores)}


@pytest.mark.usefixtures("no_omp")
@pytest.mark.parametrize("cores, no_refiner, expected", [
    (2, False, {"text_encoder": 1, "base": 1, "refiner": 1, "vae": 1}),  # never fewer than 1
    (2, True, {"text_encoder": 1, "base": 1, "vae": 1}),
    (4, False, {"text_encoder": 1, "base": 1, "refiner": 1, "vae": 1}),
    (4, True, {"text_encoder": 1, "base": 2, "vae": 1}),
    (16, False, {"text_encoder": 1, "base": 11, "refiner": 3, "vae": 1}),
    (16, True, {"text_encoder": 1, "base": 14, "vae": 1}),
])
def test_cpu_stages_split_the_cores_by_their_compute_per_image(cores, no_refiner, expected):
    assert threads(cores, no_refiner=no_refiner) == expected


@pytest.mark.usefixtures("no_omp")
@pytest.mark.parametrize("cores", [1, 2, 3, 5, 8, 16, 64])
def test_the_split_uses_every_core_once_there_is_one_per_process(cores):
    split = threads(cores)
    assert sum(split.values()) == max(cores, 4)
    assert split["base"] >= split["refiner"] >= split["vae"] >= split["text_encoder"] == 1


@pytest.mark.usefixtures("no_omp")
def test_gpu_placed_processes_get_one_thread_and_the_cpu_ones_share_the_rest():
    assert threads(16, gpus=1) == {"text_encoder": 1, "base": 1, "refiner": 1, "vae": 1}
    assert threads(16, gpus=1, vae_device="cpu") == {"text_encoder": 1, "base": 1, "refiner": 1, "vae": 13}


@pytest.mark.usefixtures("no_omp")
def test_replicas_share_their_stages_part():
    split = threads(16, base_device="cpu+cpu")
    assert split["text_encoder"] == split["vae"] == 1 and split["refiner"] == 3
    assert abs(split["base-0"] - split["base-1"]) <= 1 and split["base-0"] + split["base-1"] == 11


@pytest.mark.usefixtures("no_omp")
def test_threads_option_fixes_its_stages_and_the_others_split_what_is_left():
    assert threads(16, threads="vae=4") == {"text_encoder": 1, "base": 8, "refiner": 3, "vae": 4}
    assert threads(16, threads="base=2,text-encoder=2", gpus=1) == {
        "text_encoder": 2, "base": 2, "refiner": 1, "vae": 1}


def test_omp_num_threads_is_left_to_the_processes_not_named(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads(16, threads="base=6") == {"text_encoder": None, "base": 6, "refiner": None, "vae": None}
    options = launch.ServeOptions()
    assert all("--threads" not in options.stage_args(p) for p in options.processes(0, 16))


@pytest.mark.parametrize("text, message", [
    ("base", "not STAGE=N"),
    ("base=0", "not STAGE=N"),
    ("base=two", "not STAGE=N"),
    ("unet=2", "STAGE one of"),
    ("base=2,base=3", "names base twice"),
])
def test_a_bad_threads_option_is_refused_naming_the_entry(text, message):
    with pytest.raises(ValueError, match=message):
        launch.ServeOptions(threads=text)
    assert main(["serve", "--all", "--threads", text]) == 2
