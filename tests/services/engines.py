"""Test helpers for the stages' engines: watch what reaches an engine, and order calls that race for it."""

import time

WAIT_S = 60


def later(index: int) -> float:
    """A timeout for the index-th of calls started one after another: among equal priorities the engine takes
    the earliest deadline first, and a deadline the server reads is only as exact as grpc's timeout header."""
    return WAIT_S + 10 * index


def recording(monkeypatch, engine) -> list:
    """The jobs submitted to `engine` from now on, in order."""
    jobs, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda job: jobs.append(job) or submit(job))
    return jobs


def wait_for(condition) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
