"""Logging for stage processes: every record carries the id of the request it was logged for."""

from __future__ import annotations

import logging

from .calls import request_id

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps `record.request_id` with the current request's id, or "-" outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id() or "-"
        return True


def configure(level: int | str = logging.INFO) -> None:
    """Log to stderr with request ids; a stage process's main calls this once."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
