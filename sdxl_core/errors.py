"""Domain errors about model weights on disk; a server maps them to FAILED_PRECONDITION.

Bad arguments raise ValueError instead. WeightsNotFoundError is also a
FileNotFoundError, so `except FileNotFoundError` catches it as users expect.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_MAX_LISTED = 10


class WeightsError(Exception):
    """Base class: the weights on disk cannot serve as the requested model."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A model folder, component folder or weight file is missing."""


class UnsafeCheckpointError(WeightsError):
    """A pickle checkpoint (.bin, .ckpt, .pt) was refused because pickle can run code."""

    def __init__(self, path: str):
        self.path = str(path)
        super().__init__(
            f"refusing to read pickle checkpoint {self.path}: unpickling can run arbitrary code. "
            "Convert it to .safetensors, or, if you trust the file, pass allow_pickle=True "
            "(it is then read with torch.load(weights_only=True))."
        )


class UnknownModelTypeError(WeightsError):
    """A config or checkpoint describes no SDXL model this package can build."""


class ModelTypeMismatchError(WeightsError):
    """The weights are a valid SDXL model, but not the kind asked for (e.g. refiner for base)."""


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"{shown} ... and {more} more" if more > 0 else shown


class CheckpointMismatchError(WeightsError):
    """Checkpoint tensors do not match the model: missing, unexpected or mis-shaped."""

    def __init__(
        self,
        source: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ):
        """`mismatched` holds (name, shape in the checkpoint, shape the model expects)."""
        self.source = str(source)
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing tensor(s): {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected tensor(s): {_listing(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{n} {list(got)} (model expects {list(want)})" for n, got, want in self.mismatched]
            parts.append(f"{len(shapes)} tensor(s) of the wrong shape: {_listing(shapes)}")
        super().__init__(f"{self.source} does not match the model: " + "; ".join(parts or ["(no details)"]))
