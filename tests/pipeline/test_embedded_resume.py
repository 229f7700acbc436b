"""An embedded run cut short (Ctrl-C: KeyboardInterrupt) writes its report so far, and
``run_embedded(resume=True)`` (``lorafleet run --resume``) goes on from the aggregator's latest
snapshot in OUT/state/ to the result of the uninterrupted run (training is deterministic per seed,
round and device)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet.app.embedded import run_embedded
from schemas.config import RunConfig, load_run_config
from schemas.messages import TrainTask
from worker.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # four embedded runs of the tiny model (150 s here)


class _CtrlCInRound:
    """A trainer that raises KeyboardInterrupt (as SIGINT does) when a task of ``round_no`` starts."""

    def __init__(self, inner: Trainer, round_no: int) -> None:
        self.inner = inner
        self.round_no = round_no

    def train(self, task: TrainTask, start: Any) -> Any:
        if task.round == self.round_no:
            raise KeyboardInterrupt
        return self.inner.train(task, start)


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return load_run_config(REPO / "examples" / "tiny.yaml", overrides={"rounds": {"max_rounds": 4}})


def test_interrupted_then_resumed_ends_as_the_uninterrupted_run(config: RunConfig, tmp_path: Path) -> None:
    reference = run_embedded(config, tmp_path / "reference", quiet=True)
    out = tmp_path / "run"
    # When the run is interrupted as round 3 trains
    with pytest.raises(KeyboardInterrupt):
        run_embedded(config, out, quiet=True, wrap_trainer=lambda _i, t: _CtrlCInRound(t, 3))
    # Then its report so far is written: rounds 1 and 2, evaluated, reason interrupted
    partial = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert partial["finish_reason"] == "interrupted"
    assert [r["round"] for r in partial["rounds"] if r["accuracy"] is not None] == [1, 2]
    assert list((out / "state").glob("round-*.snapshot"))
    # When it is resumed, it goes on from round 3 to the uninterrupted run's result
    resumed = run_embedded(config, out, quiet=True, resume=True)
    assert (resumed["finish_reason"], resumed["final_round"]) == ("max_rounds", 4)
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in reference["rounds"]]
    assert resumed["final_accuracy"] == reference["final_accuracy"]


def test_a_fresh_run_does_not_restore_an_old_snapshot(config: RunConfig, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_embedded(config, out, quiet=True, wrap_trainer=lambda _i, t: _CtrlCInRound(t, 2))
    # a run started again without resume starts from round 1 (its report has every round's devices)
    fresh = run_embedded(config, out, quiet=True)
    assert fresh["updates"] == {"counted": 4 * config.devices.count}
