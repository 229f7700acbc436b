"""Embedded mode evaluates round r beside round r+1's training (lorafleet/app/embedded.py
``DeferredEvaluation``), as distributed mode does: the evaluation waits one scheduler pass, in which
the orchestrator opens the next round and the lanes take its tasks; the results do not move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aggregator.service import AggregatorService
from lorafleet.app.embedded import run_embedded
from schemas.config import load_run_config
from schemas.messages import TrainTask
from worker.lanes import LaneTrainer

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 3


def _run(tmp_path: Path, name: str) -> dict[str, Any]:
    config = load_run_config(
        REPO / "examples" / "tiny.yaml",
        overrides={
            "model": {"lanes": 2, "torch_threads": 1},
            "devices": {"count": 4},
            "rounds": {"max_rounds": ROUNDS},
        },
    )
    return run_embedded(config, tmp_path / name, quiet=True)


def test_a_rounds_evaluation_runs_once_the_next_rounds_tasks_are_in_the_lanes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, int]] = []
    submit, evaluate = LaneTrainer.submit, AggregatorService._evaluate

    def recording_submit(self: LaneTrainer, task: TrainTask, start: Any) -> None:
        events.append(("submit", task.round))
        submit(self, task, start)

    def recording_evaluate(self: AggregatorService, round_no: int) -> None:
        events.append(("evaluate", round_no))
        evaluate(self, round_no)

    monkeypatch.setattr(LaneTrainer, "submit", recording_submit)
    monkeypatch.setattr(AggregatorService, "_evaluate", recording_evaluate)
    report = _run(tmp_path, "deferred")

    assert [r for kind, r in events if kind == "evaluate"] == list(range(1, ROUNDS + 1))
    for r in range(1, ROUNDS):  # every round but the last: its successor's 4 tasks went out first
        before = events[: events.index(("evaluate", r))]
        assert before.count(("submit", r + 1)) == 4, events
    assert report["final_round"] == ROUNDS
    assert all(row["accuracy"] is not None for row in report["rounds"])


def test_deferring_the_evaluation_changes_no_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deferred = _run(tmp_path, "deferred")
    monkeypatch.setattr("lorafleet.app.embedded.DeferredEvaluation.step", lambda self, timeout=0.0: False)
    original_init = AggregatorService.__init__

    def inline_init(self: AggregatorService, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **{**kwargs, "evaluate_in_step": True})

    monkeypatch.setattr(AggregatorService, "__init__", inline_init)
    inline = _run(tmp_path, "inline")
    keys = ("accuracy", "loss", "virtual_time_s", "devices_reported", "bytes_up", "depths")
    assert [[r[k] for k in keys] for r in deferred["rounds"]] == [
        [r[k] for k in keys] for r in inline["rounds"]
    ]
    assert deferred["updates"] == inline["updates"] and deferred["final_accuracy"] == inline["final_accuracy"]
