"""Log lines: plain text for people or JSON lines for machines, each carrying the run's context.

``--log-format json`` writes one JSON object per line with ``time``, ``level``, ``logger``,
``message``, ``run_id``, ``device_id`` (a worker's), ``round`` (where known) and ``exc_info`` when
there is a traceback. The context is process-wide (:func:`set_log_context`): a service process
serves one run, a worker process one device; a worker's round is its task's, the orchestrator's
and aggregator's the run's current round (:class:`RoundFollower` reads it from the state store).
No JSON-logging library is installed with lorafleet's dependencies, so the formatter is this small
one on the standard library.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, Literal

from lorafleet.state.base import StateStore, StateStoreError

LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
#: The context fields every line carries (None until known).
CONTEXT_FIELDS = ("run_id", "device_id", "round")

_context: dict[str, Any] = dict.fromkeys(CONTEXT_FIELDS)
_context_lock = threading.Lock()


def set_log_context(**fields: Any) -> None:
    """Set context fields (``run_id``, ``device_id``, ``round``) for every later line of this process.

    Raises:
        ValueError: a field that is not a context field.
    """
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"not log context fields: {sorted(unknown)}")
    with _context_lock:
        _context.update(fields)


def log_context() -> dict[str, Any]:
    """The context fields now."""
    with _context_lock:
        return dict(_context)


class ContextFilter(logging.Filter):
    """Puts the context fields on every record (attributes ``run_id``, ``device_id``, ``round``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in log_context().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; context fields that are unknown (None) are left out."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(fmt: LogFormat = "text", level: LogLevel = "WARNING") -> None:
    """Log to stderr in ``fmt`` at ``level``, replacing any earlier configuration of the root logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn lines are log records too (JSON in JSON mode)
    logging.getLogger("pika").setLevel(logging.ERROR)  # its 404 channel closes are expected (passive checks)


class RoundFollower:
    """Keeps the ``round`` context field at the run's current round, read from the state store every
    ``every_s`` seconds on a daemon thread (orchestrator, aggregator, ``lorafleet run``)."""

    def __init__(self, state: StateStore, run_id: str, every_s: float = 1.0) -> None:
        self.state = state
        self.run_id = run_id
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="log-round")

    def start(self) -> RoundFollower:
        self._thread.start()
        return self

    def poll(self) -> None:
        """Read the run's round once."""
        try:
            round_no = self.state.get_run_fields(self.run_id).get("round")
        except StateStoreError:
            return  # the services report the state store's failures themselves
        if round_no is not None:
            set_log_context(round=int(round_no))

    def _follow(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
