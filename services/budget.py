"""How many rows one unit of an engine's work (a UNet forward, a decode) may hold: fixed, or measured on the device.

Batching is not free on every device: a row can cost more in a larger forward (a busy CPU). So the engines time
forwards of growing size the first time work of a key (latent size, ...) could share one, and keep the size whose
row costs least.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

MAX_ROWS = 64


def calibrate(forward: Callable[[int], float], first: int, limit: int = MAX_ROWS, margin: float = 0.95,
              repeats: int = 2) -> tuple[int, dict[int, float]]:
    """The rows per forward with the least time per row, and the curve measured: `forward(rows)` returns seconds
    (infinity where the rows do not fit in memory). Doubles from `first` while twice the rows cost under `margin`
    of the time per row; never past `limit`."""
    forward(first)  # warm-up: allocator, kernels' first choice
    costs: dict[int, float] = {}
    rows = first
    while rows <= max(limit, first):
        costs[rows] = min(forward(rows) for _ in range(repeats)) / rows
        if len(costs) > 1 and not costs[rows] <= costs[rows // 2] * margin:
            break
        rows *= 2
    return min(costs, key=costs.get), costs


class RowBudget:
    """Rows one unit of work may hold, per key (a denoiser's latent size and context length, a VAE's latent size):
    `--max-batch-rows`, or measured on this device the first time jobs of a key could share one (calibrate), so
    that the engine never batches where a row costs more than alone."""

    def __init__(self, fixed: int | None = None, limit: int = MAX_ROWS):
        if fixed is not None and fixed < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {fixed}")
        self.fixed, self.limit = fixed, limit
        self.curves: dict[tuple, dict[int, float]] = {}
        self._rows: dict[tuple, int] = {}

    def rows(self, key: tuple, measure: Callable[[], tuple[int, dict[int, float]]]) -> int:
        if self.fixed is not None:
            return self.fixed
        if key not in self._rows:
            self._rows[key], self.curves[key] = measure()
        return self._rows[key]


def repeated(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x`'s rows repeated to `rows` along the batch (the first) axis."""
    return x.repeat(-(-rows // x.shape[0]), *[1] * (x.ndim - 1))[:rows]


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Seconds `work` takes on `device` (synchronised on CUDA); infinity where it does not fit in memory."""
    began = time.perf_counter()
    try:
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:  # more rows than the device holds: past the budget
        torch.cuda.empty_cache()
        return math.inf
    return time.perf_counter() - began
