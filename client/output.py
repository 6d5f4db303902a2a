"""What the sdxl command writes: a progress bar per stage on stderr, and image files written atomically."""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from PIL import Image

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # anything else: PNG as sent


class ProgressBar:
    """on_progress for generate: one plain-text bar per stage, redrawn with \\r, a newline when it ends."""

    def __init__(self, stream: TextIO | None = None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.stage: str | None = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if stage != self.stage:
            self.end()
            self.stage = stage
        filled = self.width * step // total if total > 0 else 0
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{stage:<13} [{bar}] {step}/{total}")
        self.stream.flush()

    def end(self) -> None:
        """Finish the current stage's line."""
        if self.stage is not None:
            self.stream.write("\n")
            self.stream.flush()
            self.stage = None


def output_paths(output: str | os.PathLike, count: int) -> list[Path]:
    """out.png, out-1.png, out-2.png, ... for `count` images."""
    path = Path(output)
    return [path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encoded_for(path: Path, png: bytes, image: Image.Image) -> bytes:
    """The server's PNG bytes as they are, or the image re-encoded for a .jpg / .jpeg / .webp path."""
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        return png
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def save_images(png: list[bytes], images: list[Image.Image], output: str | os.PathLike) -> list[Path]:
    """Write each image to its output path (out.png, out-1.png, ...); returns the paths."""
    paths = output_paths(output, len(png))
    for path, data, image in zip(paths, png, images):
        write_atomic(path, encoded_for(path, data, image))
    return paths
