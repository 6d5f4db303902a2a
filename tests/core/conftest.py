"""Shared core fixtures: the tiny SDXL models, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# open_clip's BPE merges list where this project's development machines keep it; elsewhere
# sdxl_core.tokenizers fetches it (or SDXL_BPE_PATH names it).
LOCAL_BPE = Path("/tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture
def bpe(monkeypatch):
    """Point sdxl_core.tokenizers at the local BPE file, when there is one, for this test only."""
    if LOCAL_BPE.is_file() and not os.environ.get("SDXL_BPE_PATH"):
        monkeypatch.setenv("SDXL_BPE_PATH", str(LOCAL_BPE))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with the tiny base/, refiner/, inpainting/ and sd_xl_{base,refiner}_tiny.safetensors."""
    from sdxl_core.tiny import ensure_tiny_model

    with pytest.MonkeyPatch.context() as mp:
        if LOCAL_BPE.is_file() and not os.environ.get("SDXL_BPE_PATH"):
            mp.setenv("SDXL_BPE_PATH", str(LOCAL_BPE))
        return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")
