"""deploy/sizing.py: the traced peaks are what a run allocates, the sizes are SDXL 1.0's, and the tables in
deploy/README.md are the script's output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action  # private: the profiler's allocation timeline

from deploy import sizing
from sdxl_core.configs import TINY_BASE_UNET

README = Path(__file__).parents[2] / "deploy" / "README.md"
TINY = sizing.Models.tiny()
SIZE = 64
BY_NAME = {stage.name: stage for stage in sizing.STAGES}


def linear_stack(dims: list[int]) -> nn.Sequential:
    return nn.Sequential(*(nn.Linear(a, b) for a, b in zip(dims, dims[1:])))


def allocated_peak(run) -> int:
    """The CPU allocator's peak over `run()`, from the profiler's allocation timeline: bytes allocated
    during the run that were alive at once (what existed before is not counted)."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_stack=True) as prof:
        result = run()
        del result
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def build_and_request(stage: sizing.Stage, dtype: str = "fp32", batch: int = 2):
    modules = sizing._build(stage, TINY, dtype)
    return modules, *stage.request(modules, batch, SIZE)


def held_bytes(modules, inputs) -> int:
    return sum(t.untyped_storage().nbytes() for m in modules for t in (*m.parameters(), *m.buffers())) + \
        sum(t.untyped_storage().nbytes() for t in inputs)


# --- the measuring method


def test_the_peak_of_a_linear_stack_is_the_hand_count():
    dims, rows = [64, 256, 32, 512, 16], 100
    with FakeTensorMode():
        net, x = linear_stack(dims), torch.empty(rows, dims[0])
        peak = sizing.traced_peak([net], [x], lambda: net(x))
    weights = sum(a * b + b for a, b in zip(dims, dims[1:])) * 4
    outputs = [rows * d * 4 for d in dims[1:]]
    # Without grad each output is freed once the next exists; the caller holds x throughout.
    assert peak == weights + rows * dims[0] * 4 + max(a + b for a, b in zip(outputs, outputs[1:]))


def test_the_traced_peak_is_the_cpu_allocators_peak_where_kernels_allocate_nothing_else():
    net, x = linear_stack([64, 256, 32, 512, 16]), torch.randn(100, 64)
    assert sizing.traced_peak([net], [x], lambda: net(x)) - held_bytes([net], [x]) == allocated_peak(lambda: net(x))
    # The text encoders' kernels allocate only their outputs on CPU too. (CPU convolutions and attention
    # allocate scratch buffers the trace does not see, as cuDNN's workspace is not counted on a GPU.)
    modules, inputs, run = build_and_request(BY_NAME[sizing.STAGES[0].name])
    assert sizing.traced_peak(modules, inputs, run) - held_bytes(modules, inputs) == allocated_peak(run)


@pytest.mark.parametrize("stage", [s for s in sizing.STAGES if "fp16-fix" not in s.name],  # fp32: as VAE decode
                         ids=lambda s: s.name.split(" (")[0])
def test_tracing_fake_tensors_counts_what_the_same_run_on_real_tensors_does(stage):
    torch.manual_seed(0)
    real = sizing.traced_peak(*build_and_request(stage))
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = sizing.traced_peak(*build_and_request(stage))
    assert fake == real


def test_the_traced_peak_agrees_with_torch_memtracker():
    """MemTracker (torch.distributed._tools) counts storages its own way; it allows one call per module."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        for stage in (BY_NAME["VAE decode"], BY_NAME["VAE encode (img2img, inpaint)"]):
            modules, inputs, run = build_and_request(stage)
            tracker = MemTracker()
            tracker.track_external(*modules, *inputs)
            with torch.no_grad(), tracker:
                run()
            assert tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] == \
                sizing.traced_peak(modules, inputs, run)
        unet = sizing._build(BY_NAME["base UNet (CFG: UNet batch 2B)"], TINY, "fp16")[0]
        c = TINY_BASE_UNET
        shapes = [(2, 4, 8, 8), (2, 77, c.cross_attention_dim), (2, c.pooled_projection_dim), (2, c.num_time_ids)]
        inputs = [torch.zeros(shape, dtype=torch.float16) for shape in shapes]
        tracker = MemTracker()
        tracker.track_external(unet, *inputs)
        with torch.no_grad(), tracker:
            unet(inputs[0], 999, *inputs[1:])
        assert tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] == \
            sizing.traced_peak([unet], inputs, lambda: unet(inputs[0], 999, *inputs[1:]))


def test_a_half_vae_that_upcasts_peaks_above_a_float32_vae():
    """Why serve --all keeps the VAE in float32: SDXL's VAE (force_upcast) decodes half weights in a float32 copy."""
    decode = BY_NAME["VAE decode"]
    half, full = (sizing.size_stage(decode, TINY, SIZE, (2,), (dtype,)) for dtype in ("fp16", "fp32"))
    assert half.peak_bytes["fp16", 2] > full.peak_bytes["fp32", 2]
    fixed = sizing.size_stage(BY_NAME["VAE decode, fp16-fix VAE (`force_upcast: false`)"], TINY, SIZE, (2,), ("fp16",))
    assert fixed.peak_bytes["fp16", 2] < full.peak_bytes["fp32", 2]


# --- SDXL 1.0's sizes


def test_the_default_configs_are_those_of_the_official_folders(reference_dir):
    assert sizing.Models.from_folders(reference_dir / "base", reference_dir / "refiner") == sizing.Models()


def test_parameter_counts_and_fp16_weights_are_sdxl_1_0s():
    """Counts from tests/data/reference/README.md; published fp16 files hold the weights plus a small header."""
    counts = {stage.name: sizing.size_stage(stage, sizing.Models(), batches=()) for stage in sizing.STAGES}
    clip_l, bigg = 123_060_480, 694_659_840
    published = {  # row: (parameters, fp16 file bytes or None)
        "text encoder: CLIP-L + bigG (base), bigG (refiner)": (clip_l + 2 * bigg, 246_144_152 + 2 * 1_389_382_176),
        "base UNet (CFG: UNet batch 2B)": (2_567_463_684, 5_135_149_760),
        "refiner UNet (CFG: UNet batch 2B)": (2_259_526_660, 4_519_210_760),
        "VAE decode": (83_653_863, 167_335_342),
    }
    for name, (parameters, file_bytes) in published.items():
        row = counts[name]
        assert row.parameters == parameters
        assert 0 < file_bytes - row.weight_bytes["fp16"] < 1_000_000  # the safetensors headers
        assert row.weight_bytes["fp32"] == 2 * row.weight_bytes["fp16"] - _int64_buffers(name)


def _int64_buffers(name: str) -> int:
    return 3 * 77 * 8 if name.startswith("text encoder") else 0  # CLIP's position_ids, one per encoder


# --- the README is the script's output


def readme_section(title: str) -> str:
    """The text of deploy/README.md's `## title` section."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def table_rows(section: str, header: str = "| ") -> list[list[str]]:
    """The cells of the section's first markdown table whose header starts so, header and separator excluded."""
    section = "\n" + section
    lines = section[section.index("\n" + header):].strip().split("\n\n")[0].splitlines()
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines[2:]]


def test_the_readme_sizing_table_has_the_scripts_rows_and_columns():
    section = readme_section("Sizing")
    header = "| " + " | ".join(["stage", *sizing.columns()]) + " |"
    assert header in section
    assert [row[0] for row in table_rows(section)] == [stage.name for stage in sizing.STAGES]
    assert "python -m deploy.sizing" in section


def test_the_readme_sizes_are_the_scripts():
    """Every row's parameters and weights, and the VAE rows whole (their traces take seconds; the UNets' and
    text encoders' peaks take minutes: test_the_readme_tables_are_the_scripts_output)."""
    readme = {row[0]: row[1:] for row in table_rows(readme_section("Sizing"))}
    for stage in sizing.STAGES:
        traced = stage.name.startswith("VAE")
        row = sizing.size_stage(stage, sizing.Models(), batches=sizing.BATCHES if traced else ())
        computed = sizing.cells(row)
        compared = range(len(computed)) if traced else (0, 2, 3)  # parameters, weights fp16/bf16, weights fp32
        assert [readme[stage.name][i] for i in compared] == [computed[i] for i in compared], stage.name


def test_the_readme_gpu_table_sums_the_readme_peaks_of_the_default_placement():
    def peaks(cells: dict[str, str]) -> dict[tuple[str, int], int]:
        given = {(d, b): cells[f"peak {d} B={b}"] for d in sizing.DTYPES for b in sizing.BATCHES}
        return {key: round(float(gib) * sizing.GiB) for key, gib in given.items() if gib != "—"}

    sizes = {row[0]: dict(zip(sizing.columns(), row[1:])) for row in table_rows(readme_section("Sizing"))}
    rows = [sizing.Row(name, 0, {}, peaks(cells)) for name, cells in sizes.items()]
    expected = table_rows(sizing.gpu_table(rows))
    written = table_rows(readme_section("Placement on one host"), "| GPUs | GPU |")
    assert [r[:3] for r in written] == [r[:3] for r in expected]
    for w, e in zip(written, expected):  # sums of rounded peaks: within the rounding of each term
        assert all(abs(float(a) - float(b)) <= 0.02 for a, b in zip(w[3:], e[3:])), (w, e)


def test_the_readme_tables_are_the_scripts_output():  # about 2 minutes on 2 CPU cores: every stage traced
    rows = [sizing.size_stage(stage, sizing.Models()) for stage in sizing.STAGES]
    text = README.read_text()
    assert sizing.table(rows) in text
    assert sizing.gpu_table(rows) in text
