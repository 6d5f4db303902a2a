"""The tiny random-weight models: deterministic bytes, sane activations, generated once and atomically."""

from __future__ import annotations

import filecmp
import json

import pytest
import torch

import sdxl_core.tiny as tiny
from sdxl_core.configs import SDXL_SCHEDULER_CONFIG
from sdxl_core.errors import WeightsNotFoundError
from sdxl_core.loading.folder import load_components, save_components


def test_generation_writes_the_same_bytes_every_time(tiny_model_dir, tmp_path):
    save_components(tiny.tiny_components("base"), tmp_path / "base")
    def files(root):
        return sorted(p.relative_to(root) for p in (root / "base").rglob("*") if p.is_file())

    assert files(tmp_path) == files(tiny_model_dir)
    for f in files(tmp_path):
        assert (tmp_path / f).read_bytes() == (tiny_model_dir / f).read_bytes(), f


def test_refiner_and_inpainting_share_the_base_vae_and_bigg(tiny_model_dir):
    base, refiner, inpainting = (tiny_model_dir / t for t in ("base", "refiner", "inpainting"))
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        assert filecmp.cmp(base / part, refiner / part, shallow=False)
        assert filecmp.cmp(base / part, inpainting / part, shallow=False)
    assert not (refiner / "text_encoder").exists() and not (refiner / "tokenizer").exists()
    assert json.loads((inpainting / "unet/config.json").read_text())["in_channels"] == 9
    for name in ("sd_xl_base_tiny.safetensors", "sd_xl_refiner_tiny.safetensors"):
        assert (tiny_model_dir / name).stat().st_size > 1e6


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_pipeline_files_are_byte_identical_to_the_official_ones(kind, tiny_model_dir, reference_dir):
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        assert (tiny_model_dir / kind / name).read_bytes() == (reference_dir / kind / name).read_bytes(), name
    assert json.loads((reference_dir / kind / "scheduler/scheduler_config.json").read_text()) == SDXL_SCHEDULER_CONFIG


@torch.no_grad()
def test_tiny_base_runs_end_to_end_with_moderate_activations(tiny_model_dir):
    c = load_components(tiny_model_dir / "base")
    ids = c.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    clip_l = c.text_encoder(ids, output_hidden_states=True)
    bigg = c.text_encoder_2(ids, output_hidden_states=True)
    context = torch.cat([clip_l.hidden_states[-2], bigg.hidden_states[-2]], dim=-1)  # (1, 77, 32 + 48)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    eps = c.unet(latents, torch.tensor([500.0]), context, bigg.text_embeds, time_ids)
    images = c.vae.decode(latents / c.vae.config.scaling_factor)  # (1, 3, 64, 64)
    for x in (context, eps, images):
        assert x.isfinite().all() and 0.1 < x.std() < 10
    assert (images.abs() <= 1).float().mean() > 0.5  # mostly inside the image range


def test_ensure_tiny_model_reuses_a_complete_folder(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(tiny, "write_tiny_models", lambda out: pytest.fail("regenerated an existing model"))
    assert tiny.ensure_tiny_model(tiny_model_dir) == tiny_model_dir


def _fake_writer(out):
    (out / "base").mkdir(parents=True)
    (out / "base" / "model_index.json").write_text("{}")


def test_ensure_tiny_model_generates_on_first_use_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "write_tiny_models", _fake_writer)
    target = tiny.ensure_tiny_model(tmp_path / "models" / "tiny")
    assert (target / "base" / "model_index.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"]


def test_ensure_tiny_model_keeps_the_winner_when_two_processes_race(tmp_path, monkeypatch):
    target = tmp_path / "tiny"

    def slower_writer(out):  # another process finishes first, while this one is writing
        _fake_writer(out)
        (out / "base" / "model_index.json").write_text('"mine"')
        _fake_writer(target)
        (target / "base" / "model_index.json").write_text('"winner"')

    monkeypatch.setattr(tiny, "write_tiny_models", slower_writer)
    assert tiny.ensure_tiny_model(target) == target
    assert (target / "base" / "model_index.json").read_text() == '"winner"'
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_ensure_tiny_model_refuses_a_foreign_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "write_tiny_models", _fake_writer)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "notes.txt").write_text("not a model")
    with pytest.raises(WeightsNotFoundError, match="holds no tiny model"):
        tiny.ensure_tiny_model(tmp_path / "tiny")


def test_default_model_dir_follows_sdxl_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SDXL_MODEL_DIR", str(tmp_path))
    assert tiny.default_model_dir() == tmp_path
    monkeypatch.delenv("SDXL_MODEL_DIR")
    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path / "cache"))
    assert tiny.default_model_dir() == tmp_path / "cache" / tiny.TINY_MODEL_NAME
    monkeypatch.delenv("SDXL_CACHE_DIR")
    assert tiny.default_model_dir().parts[-3:] == (".cache", "sdxl", tiny.TINY_MODEL_NAME)
