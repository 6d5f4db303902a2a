"""The stage engine: one worker thread owns a stage's model; RPC threads only submit jobs and relay their events.

Each iteration the worker takes in the jobs submitted since the last one, drops those whose call has ended
(cancelled, past its deadline), orders the rest by the policy and lets the stage advance some of them by one
unit of work (a denoiser: one UNet evaluation for each job it packs into a forward). Jobs join and leave
between iterations, so a short job never waits for a long one to finish.

Policies (services/README.md, "The engine"):
- "batch" (the default): by priority (interactive, default, batch); among equals, the job advanced longest ago
  first (round robin: none starves, and a short job finishes in proportion to its own steps), then the earliest
  deadline, then arrival. The stage packs as many of them into one unit of work as its budget allows.
- "fifo": take turns, as a server without an engine would: the oldest job alone, until it is done.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sdxl.v1 import stage_pb2

from . import metrics, tracing
from .errors import Cancelled, DeadlineExceeded

POLICIES = ("batch", "fifo")


class Priority(enum.IntEnum):
    """sdxl.v1.Priority without its UNSPECIFIED: lower runs first."""

    INTERACTIVE = 0
    DEFAULT = 1
    BATCH = 2


PRIORITIES = {stage_pb2.PRIORITY_UNSPECIFIED: Priority.DEFAULT, stage_pb2.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
              stage_pb2.PRIORITY_DEFAULT: Priority.DEFAULT, stage_pb2.PRIORITY_BATCH: Priority.BATCH}


def priority(value: int) -> Priority:
    """A request's sdxl.v1.Priority as the engine orders it; ValueError for a value outside the enum."""
    if value not in PRIORITIES:
        raise ValueError(f"`priority` must be one of {', '.join(stage_pb2.Priority.keys())}, got {value}")
    return PRIORITIES[value]


@dataclass(eq=False)
class Job:
    """One request inside the engine: its work, its place in the policy's order, and its events.

    Events, read by the RPC thread: ("progress", value) any number of times, then ("result", value) or
    ("error", exception).
    """

    work: Any  # the stage's description of the request; the stage may replace it as the job advances
    priority: Priority = Priority.DEFAULT
    deadline: float | None = None  # time.monotonic() seconds; past it the job is dropped
    ended: threading.Event = field(default_factory=threading.Event)  # set when its call is over: dropped
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when the engine first advanced it
    served: int = -1  # the iteration that last advanced it
    seq: int = 0  # arrival order
    done: bool = False
    # The submitting RPC thread's context (its server span): the engine's worker parents the job's spans on it.
    trace_context: Any = field(default_factory=tracing.current)

    def progress(self, value) -> None:
        self.events.put(("progress", value))

    def finish(self, value) -> None:
        self.done = True
        self.events.put(("result", value))

    def fail(self, error: BaseException) -> None:
        self.done = True
        self.events.put(("error", error))

    def sort_key(self) -> tuple:
        return self.priority, self.served, self.deadline if self.deadline is not None else math.inf, self.seq


class Stopped(Exception):
    """The engine stopped before the job was done."""


class Engine:
    """A worker thread that owns a model. Subclasses implement `iterate`."""

    def __init__(self, stage: str, policy: str = "batch"):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.stage, self.policy = stage, policy
        self.log = logging.getLogger(f"sdxl.{stage}")
        self.jobs: list[Job] = []  # the worker's own: only it reads or changes this list
        self.iteration = 0
        self._cond = threading.Condition()
        self._new: list[Job] = []
        self._seq = itertools.count()
        self._stopped = False
        metrics.track_engine(stage, self.held)
        self._thread = threading.Thread(target=self._loop, name=f"sdxl-{stage}-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopped:
                raise Stopped(f"the {self.stage} engine is stopped")
            job.seq = next(self._seq)
            self._new.append(job)
            self._cond.notify()
        return job

    def held(self) -> int:
        """Jobs submitted and not yet done or dropped."""
        with self._cond:
            return len(self._new) + len(self.jobs)

    def events(self, job: Job) -> Iterator[tuple[str, Any]]:
        """The job's ("progress", value) events and last its ("result", value); raises its error. Closing the
        iterator early (the call ended) drops the job at the engine's next iteration."""
        try:
            while True:
                kind, value = job.events.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "result":
                    return
        finally:
            job.ended.set()

    def stop(self) -> None:
        """Fail the jobs still held and end the worker once its current iteration is over."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def serve(self, job: Job) -> None:
        """Mark `job` advanced this iteration; the first time, record how long it waited for its first turn."""
        job.served = self.iteration
        if job.started is None:
            job.started = time.monotonic()
            metrics.observe_queue_wait(self.stage, job.started - job.submitted)

    def iterate(self, jobs: list[Job]) -> None:
        """Advance some of `jobs` (in the policy's order, never empty) by one unit of work: `serve` each one it
        works on, `finish` those that are done."""
        raise NotImplementedError

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._new or self.jobs or self._stopped):
                    self._cond.wait()
                if self._stopped:
                    for job in self.jobs + self._new:
                        job.fail(Stopped(f"the {self.stage} stage is stopping"))
                    return
                self.jobs += self._new
                self._new.clear()
            self._drop_ended()
            if not self.jobs:
                continue
            ordered = sorted(self.jobs, key=(lambda j: j.seq) if self.policy == "fifo" else Job.sort_key)
            try:
                self.iterate(ordered[:1] if self.policy == "fifo" else ordered)
            except Exception as exc:  # noqa: BLE001 -- the jobs of this iteration fail; the engine serves on
                self.log.exception("%s engine iteration failed", self.stage)
                for job in ordered:
                    if job.served == self.iteration and not job.done:
                        job.fail(exc)
            self.iteration += 1
            self.jobs = [job for job in self.jobs if not job.done]

    def _drop_ended(self) -> None:
        now = time.monotonic()
        for job in self.jobs:
            if job.deadline is not None and now > job.deadline:
                job.fail(DeadlineExceeded("deadline exceeded"))
            elif job.ended.is_set():
                job.fail(Cancelled("cancelled by the client"))
        self.jobs = [job for job in self.jobs if not job.done]
