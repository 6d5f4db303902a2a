"""The weights Job's command: a model folder copied or downloaded into DEST whole, or not at all."""

import errno
import filecmp
import shutil
import subprocess
import sys
import tempfile

import pytest

from sdxl_core.loading.fetch import fetch, main

HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def same_tree(a, b) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_a_local_folder_is_copied_whole_by_the_command(tiny_model_dir, tmp_path):
    dest = tmp_path / "models" / "sdxl-base-1.0"
    proc = subprocess.run([sys.executable, "-m", "sdxl_core.loading.fetch", str(tiny_model_dir / "base"), str(dest)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert same_tree(tiny_model_dir / "base", dest)
    assert leftovers(dest.parent) == ["sdxl-base-1.0"], "the temporary folder was left behind"


def test_a_complete_dest_is_left_alone(tiny_model_dir, tmp_path, capsys):
    dest = fetch(tiny_model_dir / "refiner", tmp_path / "refiner")
    marker = dest / "model_index.json"
    before = marker.stat().st_mtime_ns
    assert fetch(tmp_path / "no-such-source", dest) == dest  # would fail if it looked at SOURCE
    assert main([str(tiny_model_dir / "base"), str(dest)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert marker.stat().st_mtime_ns == before and same_tree(tiny_model_dir / "refiner", dest)


def test_a_failed_copy_leaves_no_dest(tiny_model_dir, tmp_path, monkeypatch):
    copied, real_copy2 = [], shutil.copy2

    def copy2(src, dst):
        if len(copied) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        copied.append(real_copy2(src, dst))

    monkeypatch.setattr(shutil, "copy2", copy2)
    dest = tmp_path / "models" / "sdxl-base-1.0"
    with pytest.raises(OSError, match="No space left"):
        fetch(tiny_model_dir / "base", dest)
    assert len(copied) == 3 and leftovers(dest.parent) == []
    monkeypatch.undo()
    fetch(tiny_model_dir / "base", dest)  # the rerun starts clean and completes
    assert same_tree(tiny_model_dir / "base", dest)


def test_a_killed_runs_partial_folder_is_removed(tiny_model_dir, tmp_path):
    stale = tmp_path / ".sdxl-base-1.0.abc123.partial"
    (stale / "unet").mkdir(parents=True)
    other = tmp_path / ".sdxl-refiner-1.0.def456.partial"  # another DEST's run, maybe still going
    other.mkdir()
    fetch(tiny_model_dir / "base", tmp_path / "sdxl-base-1.0")
    assert leftovers(tmp_path) == [other.name, "sdxl-base-1.0"]


def test_sources_that_are_no_model_folder_fail_with_the_reason(tiny_model_dir, tmp_path, capsys):
    dest = tmp_path / "out" / "model"
    assert main([str(tiny_model_dir / "base" / "unet"), str(dest)]) == 1
    assert "no diffusers model folder" in capsys.readouterr().err
    assert main([str(tmp_path / "not" / "here"), str(dest)]) == 1
    assert "neither a folder nor a hub id" in capsys.readouterr().err
    assert leftovers(dest.parent) == []
    assert main([str(tmp_path)]) == 2  # usage


def test_an_unfinished_dest_is_not_overwritten(tiny_model_dir, tmp_path):
    dest = tmp_path / "model"
    (dest / "unet").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="remove it"):
        fetch(tiny_model_dir / "base", dest)


def test_a_read_only_volume_says_so(tiny_model_dir, tmp_path, monkeypatch):
    def mkdtemp(**kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(PermissionError, match="mounted read-write"):
        fetch(tiny_model_dir / "base", tmp_path / "model")


def test_a_hub_id_downloads_the_diffusers_files_and_links_them_from_the_cache(fake_hub, tiny_model_dir, tmp_path):
    dest = fetch(HUB_ID, tmp_path / "sdxl-base-1.0")
    (repo_id, kwargs), = fake_hub
    assert repo_id == HUB_ID
    # hub.model_folder's selection: configs, tokenizers, the plain weights the services load (no fp16 variant)
    assert kwargs["allow_patterns"] == ["*.json", "*.txt", "*/*.safetensors"]
    assert "*.fp16.safetensors" in kwargs["ignore_patterns"]
    assert same_tree(tiny_model_dir / "base", dest)
    weights = next(dest.rglob("*.safetensors")).relative_to(dest)
    assert (dest / weights).stat().st_ino == (tiny_model_dir / "base" / weights).stat().st_ino, "copied, not linked"


def test_a_hub_id_with_hf_hub_offline_fails_before_downloading(fake_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([HUB_ID, str(tmp_path / "model")]) == 1
    assert "HF_HUB_OFFLINE=0" in capsys.readouterr().err
    assert fake_hub == [] and leftovers(tmp_path) == []
