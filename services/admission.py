"""Bounded admission: max_concurrency requests run, max_queue wait, the rest are refused at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import Draining, QueueFull

_POLL_S = 0.05  # how often a queued request checks whether its client is still there


class Admission:
    """A counter of running and queued requests, checked before any model work starts."""

    def __init__(self, max_concurrency: int, max_queue: int):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError(f"need max_concurrency >= 1 and max_queue >= 0, got {max_concurrency}, {max_queue}")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._running = 0
        self._waiting = 0
        self._closed = False

    @contextmanager
    def slot(self, check: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Hold a worker slot for the block; queue if all are busy; raise QueueFull past the queue.

        `check` runs while queued and raises to give up (the client cancelled or its deadline passed).
        Queued requests get Draining once close() is called; running ones finish.
        """
        with self._cond:
            self._enter(check)
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _enter(self, check: Callable[[], None]) -> None:
        if self._closed:
            raise Draining("server is shutting down; retry on another replica")
        if self._running >= self.max_concurrency:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"server busy: {self._running} running, {self._waiting} queued; retry later")
            self._waiting += 1
            try:
                while self._running >= self.max_concurrency and not self._closed:
                    check()
                    self._cond.wait(_POLL_S)
            finally:
                self._waiting -= 1
            if self._closed:
                raise Draining("server is shutting down; retry on another replica")
        self._running += 1

    def close(self) -> None:
        """Refuse new requests and release queued ones with Draining."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until nothing runs or waits; False if `timeout` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running == 0 and self._waiting == 0, timeout)

    @property
    def in_flight(self) -> int:
        """Requests running or queued now."""
        with self._cond:
            return self._running + self._waiting

    @property
    def running(self) -> int:
        """Requests holding a slot now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Requests queued for a slot now."""
        return self._waiting
