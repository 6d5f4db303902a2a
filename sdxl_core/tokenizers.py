"""The CLIP BPE tokenizer files of SDXL, written offline, and the tokenizers read from them.

Both SDXL tokenizers share OpenAI's CLIP vocabulary. Its source is the merges list
`bpe_simple_vocab_16e6.txt.gz` that the PyPI package open_clip_torch ships as package
data; from it we rebuild vocab.json and merges.txt byte for byte as published with
stabilityai/stable-diffusion-xl-base-1.0, following open_clip's tokenizer.py.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 49408 = 2 * 256 bytes + merges + 2 special


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("SDXL_CACHE_DIR") or Path.home() / ".cache" / "sdxl")


def _check_sha256(path: Path, origin: str) -> Path:
    if _sha256(path) != BPE_SHA256:
        raise RuntimeError(f"{path} ({origin}) is not open_clip's {BPE_FILENAME}: its sha256 is not {BPE_SHA256}")
    return path


def bpe_merges_path(find_links: str | Path | None = None) -> Path:
    """Path of open_clip's BPE merges list: $SDXL_BPE_PATH, else the cache, else fetched into it.

    Fetching runs `pip download` of the open_clip_torch wheel (without its dependencies)
    and extracts the one data file; `find_links` points pip at a folder of wheels instead
    of the package index.
    """
    if env := os.environ.get("SDXL_BPE_PATH"):
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"SDXL_BPE_PATH={env} is not a file; point it at {BPE_FILENAME}")
        return _check_sha256(path, "SDXL_BPE_PATH")
    cached = cache_dir() / BPE_FILENAME
    if cached.is_file():
        return _check_sha256(cached, "cache; delete it to fetch again")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = _gz_from_wheel(_download_wheel(Path(tmp), find_links))
        fd, partial = tempfile.mkstemp(dir=cached.parent, prefix=BPE_FILENAME, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            _check_sha256(Path(partial), f"extracted from the {OPEN_CLIP_WHEEL} wheel")
            os.replace(partial, cached)
        finally:
            Path(partial).unlink(missing_ok=True)
    return cached


def _download_wheel(folder: Path, find_links: str | Path | None) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    result = subprocess.run(cmd + [OPEN_CLIP_WHEEL], capture_output=True, text=True)
    wheels = sorted(folder.glob("open_clip_torch-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not fetch {BPE_FILENAME}: `{' '.join(cmd)} {OPEN_CLIP_WHEEL}` failed:\n"
            f"{result.stderr.strip()[-2000:]}\n"
            f"Set SDXL_BPE_PATH to a copy of {BPE_FILENAME} (open_clip/ in the {OPEN_CLIP_WHEEL} "
            f"wheel), or place it in {cache_dir()} (SDXL_CACHE_DIR)."
        )
    return wheels[0]


def _gz_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(f"open_clip/{BPE_FILENAME}")
        except KeyError:
            raise RuntimeError(f"{wheel.name} holds no open_clip/{BPE_FILENAME}") from None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in CLIP's order (printable bytes first)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_and_merges(bpe_path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token -> id table and BPE merges, as open_clip's SimpleTokenizer builds them."""
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(vocab)}, merges


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _special_tokens_map(pad_token: str) -> dict:
    bos, eos = _added_token(BOS_TOKEN), _added_token(EOS_TOKEN)
    return {"bos_token": bos, "eos_token": eos, "pad_token": pad_token, "unk_token": eos}


def _tokenizer_config(pad_token: str) -> dict:
    bos, eos = ({"__type": "AddedToken", **_added_token(t)} for t in (BOS_TOKEN, EOS_TOKEN))
    return {
        "add_prefix_space": False,
        "bos_token": bos,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": eos,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(folder: str | Path, pad_token: str, bpe_path: str | Path | None = None) -> Path:
    """Write an SDXL tokenizer folder: `tokenizer` pads with "<|endoftext|>", `tokenizer_2` with "!"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder, merges = clip_vocab_and_merges(bpe_path or bpe_merges_path())
    _write_json(folder / "vocab.json", encoder)
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_bytes(merges_text.encode("utf-8"))
    _write_json(folder / "special_tokens_map.json", _special_tokens_map(pad_token))
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(pad_token))
    return folder


def load_tokenizer(folder: str | Path):
    """transformers' CLIPTokenizer from a folder's vocab.json and merges.txt, padding as its config says."""
    folder = Path(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    pad_token = config.get("pad_token", EOS_TOKEN)
    if isinstance(pad_token, dict):
        pad_token = pad_token["content"]
    kwargs = dict(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=pad_token,
                  model_max_length=MODEL_MAX_LENGTH)
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 4: the slow class
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), **kwargs)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)
