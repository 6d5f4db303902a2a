"""The denoiser's engine: each iteration packs the rows of jobs at any step into one UNet forward.

A job's rows (two per image with guidance) carry their own timestep, context, pooled embedding, time ids, LoRA
adapters and, for an inpainting UNet, mask and masked image; each job's sampler then steps its own rows with its
own state (sdxl_core.denoise.Denoising). Jobs of different latent sizes or context lengths run in separate forwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdxl_core.denoise import Denoising, OnStep, UNetInputs
from sdxl_core.lora import Loras, applied_rows

from . import metrics, tracing
from .budget import RowBudget, calibrate, repeated, timed
from .engine import Engine, Job

MIN_ROWS = 2  # one image with guidance: never split


@dataclass
class DenoiseWork:
    """A Denoise call inside the engine. `start` builds its run on the worker (noise drawn, tensors on the device)."""

    start: Callable[[OnStep], Denoising]
    key: tuple[int, ...]  # (h, w, context length): only jobs of one key share a forward
    rows: int
    loras: Loras | None = None  # LoRA adapters on its rows
    run: Denoising | None = None


class DenoiseEngine(Engine):
    """Advances jobs one UNet evaluation per iteration, as many per forward as the row budget holds."""

    def __init__(self, unet: torch.nn.Module, stage: str, policy: str = "batch", budget: RowBudget | None = None):
        self.unet, self.budget = unet, budget or RowBudget()
        super().__init__(stage, policy)

    @torch.no_grad()
    def iterate(self, jobs: list[Job]) -> None:
        lead = jobs[0]
        peers = [job for job in jobs if job.work.key == lead.work.key]
        budget = lead.work.rows
        if len(peers) > 1:
            budget = max(budget, self.budget.rows(lead.work.key, lambda: self._calibrate(lead)))
        batch, rows = [], 0
        for job in peers:
            if job.done or (batch and rows + job.work.rows > budget):
                continue
            if self._begin(job):
                batch.append(job)
                rows += job.work.rows
        if not batch:
            return
        began, began_ns = time.perf_counter(), time.time_ns()
        with applied_rows([(job.work.loras, job.work.rows) for job in batch]):
            noise_pred = self.unet(*UNetInputs.cat([job.work.run.unet_inputs() for job in batch]))
        for job, rows_of_job in zip(batch, noise_pred.split([job.work.rows for job in batch])):
            run = job.work.run
            # Each job's step: the forward it shared, then its own sampler step; under the job's server span.
            with tracing.span("denoise step", parent=job.trace_context, start_ns=began_ns,
                              step=run.step - run.start + 1, total=run.end - run.start, rows_in_forward=rows):
                run.advance(rows_of_job)
            if run.done:
                job.finish(run.latents)
        metrics.observe_step(self.stage, time.perf_counter() - began)
        metrics.observe_forward(self.stage, rows)

    def _begin(self, job: Job) -> bool:
        """Serve the job this iteration, starting its run first if new; False if it could not start."""
        self.serve(job)
        if job.work.run is None:
            try:
                job.work.run = job.work.start(lambda i, total, latents: job.progress((i + 1, total, latents)))
            except Exception as exc:  # noqa: BLE001 -- this job's inputs: it fails alone
                job.fail(exc)
                return False
        return True

    def _calibrate(self, lead: Job) -> tuple[int, dict[int, float]]:
        """The per-row cost curve of this UNet at the lead job's latent size and context length."""
        if not self._begin(lead):
            return MIN_ROWS, {}
        one = lead.work.run.unet_inputs()

        def forward(rows: int) -> float:
            inputs = UNetInputs(*(repeated(t, rows) for t in one))
            return timed(lambda: self.unet(*inputs), one.sample.device)

        rows, curve = calibrate(forward, max(MIN_ROWS, one.rows), self.budget.limit)
        self.log.info("row budget of %s at latents %sx%s, context %s: %d rows; seconds per row %s", self.stage,
                      *lead.work.key, rows, {r: round(c, 5) for r, c in curve.items()})
        return rows, curve
