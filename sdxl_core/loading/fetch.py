"""Fill a model folder once: `python -m sdxl_core.loading.fetch SOURCE DEST` (the Kubernetes weights Job).

SOURCE is a local diffusers folder, copied, or a hub id such as stabilityai/stable-diffusion-xl-base-1.0,
downloaded with `hub.model_folder`'s file selection (configs, tokenizers, the plain safetensors). DEST
appears whole or not at all: the files go to a temporary folder beside it, which is then renamed. A DEST
that holds model_index.json is complete, and a second run leaves it alone.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from sdxl_core.errors import WeightsNotFoundError
from sdxl_core.loading.hub import is_hub_id, model_folder

MARKER = "model_index.json"  # every diffusers pipeline folder has one; DEST has it only once whole


def fetch(source: str | Path, dest: str | Path) -> Path:
    """DEST as a complete copy of SOURCE's diffusers folder; nothing is written when DEST is already complete."""
    dest = Path(dest)
    if complete(dest):
        return dest
    if dest.exists():
        raise FileExistsError(f"{dest} exists but has no {MARKER}: not a finished fetch; remove it and run again")
    folder, from_hub = _source_folder(source)
    for stale in dest.parent.glob(f".{dest.name}.*.partial"):  # left by a killed run; one fetch per DEST at a time
        shutil.rmtree(stale, ignore_errors=True)
    partial = _partial_beside(dest)
    try:
        # Hub files are hard-linked out of the download cache when it is on DEST's filesystem: no second copy.
        shutil.copytree(folder, partial, dirs_exist_ok=True, copy_function=_link_or_copy if from_hub else shutil.copy2)
        try:
            os.rename(partial, dest)  # atomic; fails if another fetch got there first
        except OSError:
            if not complete(dest):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _source_folder(source: str | Path) -> tuple[Path, bool]:
    """(the diffusers folder to copy, whether it came from the hub)."""
    local = Path(source)
    from_hub = is_hub_id(source)
    if from_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no", "off"):
        raise RuntimeError(f"no folder {source}, and downloading it as a hub id needs HF_HUB_OFFLINE=0 (the image"
                           " sets HF_HUB_OFFLINE=1 for the services)")
    folder = model_folder(source) if from_hub else local
    if not folder.is_dir():
        raise WeightsNotFoundError(f"SOURCE {source} is neither a folder nor a hub id (owner/name)")
    if not complete(folder):
        raise WeightsNotFoundError(f"SOURCE {source} is no diffusers model folder: {folder} has no {MARKER}")
    return folder, from_hub


def _partial_beside(dest: Path) -> Path:
    """A fresh temporary folder in DEST's parent, so the final rename stays on one filesystem."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    except OSError as e:
        hint = "is the volume mounted read-write?"
        raise PermissionError(f"cannot write into {dest.parent} ({e.strerror}): {hint}") from e


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # follows the cache's snapshot symlink to its blob
    except OSError:
        shutil.copy2(src, dst)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m sdxl_core.loading.fetch SOURCE DEST\n"
              "  SOURCE: a local diffusers folder or a hub id (owner/name); DEST: the folder to create",
              file=sys.stderr)
        return 2
    source, dest = argv
    if complete(Path(dest)):
        print(f"{dest} is complete ({MARKER} present): nothing to do", flush=True)
        return 0
    try:
        print(f"fetched {source} into {fetch(source, dest)}", flush=True)
    except Exception as e:  # one line for the Job's log; the exit code fails the Job
        print(f"fetch {source} -> {dest} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
