"""--log-format json: every line is one JSON object carrying the run's context."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator

import pytest

from lorafleet.app.logs import CONTEXT_FIELDS, RoundFollower, configure_logging, log_context, set_log_context
from lorafleet.state.memory import InMemoryStateStore


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    before = log_context()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    set_log_context(**before)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_a_json_line_parses_and_carries_run_device_and_round(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    set_log_context(run_id="r1", device_id="dev-0003", round=None)
    logging.getLogger("worker.service").info("before any task")
    set_log_context(round=7)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("worker.service").exception("task %s failed", "t-1")
    logging.getLogger("x").debug("below the level")

    first, second = _lines(capsys)
    assert first == {
        "time": first["time"],
        "level": "INFO",
        "logger": "worker.service",
        "message": "before any task",
        "run_id": "r1",
        "device_id": "dev-0003",
    }  # round unknown yet: left out
    assert (second["level"], second["message"], second["round"]) == ("ERROR", "task t-1 failed", 7)
    assert "ValueError: boom" in str(second["exc_info"])


def test_warnings_become_json_lines_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "WARNING")
    set_log_context(run_id="r2", device_id=None, round=None)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
    (line,) = _lines(capsys)
    assert line["logger"] == "py.warnings" and "deprecated thing" in str(line["message"])
    assert line["run_id"] == "r2"


def test_the_round_follower_reads_the_runs_round_from_the_state_store() -> None:
    state = InMemoryStateStore()
    state.put_run_field("r3", "round", 4)
    set_log_context(round=None)
    RoundFollower(state, "r3").poll()
    assert log_context()["round"] == 4


def test_only_context_fields_can_be_set() -> None:
    assert CONTEXT_FIELDS == ("run_id", "device_id", "round")
    with pytest.raises(ValueError, match="task"):
        set_log_context(task="x")
