import huggingface_hub
import pytest


@pytest.fixture
def fake_hub(monkeypatch, tiny_model_dir):
    """huggingface_hub.snapshot_download answering every repo id with the tiny base folder; the calls, recorded."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_model_dir / "base")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return calls
