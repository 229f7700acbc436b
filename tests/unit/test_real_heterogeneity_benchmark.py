"""benchmarks/real_heterogeneity.py's reading of two reports (the check, without the processes)."""

from __future__ import annotations

from typing import Any

from benchmarks.real_heterogeneity import lone_deeper, summarise, wall_to_accuracy


def _report(depths: list[dict[str, int]], accuracies: list[float], times: str = "measured") -> dict[str, Any]:
    rounds = [
        {"round": i + 1, "depths": d, "accuracy": a, "wall_time_s": 10.0 * (i + 1)}
        for i, (d, a) in enumerate(zip(depths, accuracies, strict=True))
    ]
    return {"rounds": rounds, "final_accuracy": accuracies[-1], "times": times, "_bench": {}}


def test_the_lone_worker_must_be_deeper_than_every_pinned_one() -> None:
    pinned = {"dev-0000": 2, "dev-0001": 2, "dev-0002": 3}
    report = _report([{**pinned, "dev-0003": 4}, {**pinned, "dev-0003": 3}, pinned], [0.5, 0.6, 0.7])
    assert lone_deeper(report) == [True, False, False]


def test_wall_seconds_to_fedloras_final_accuracy() -> None:
    legend = _report([{}] * 3, [0.6, 0.8, 0.81])
    fedlora = _report([{}] * 3, [0.5, 0.7, 0.79], times="measured")
    assert wall_to_accuracy(legend, 0.79) == 20.0 and wall_to_accuracy(legend, 0.9) is None
    summary = summarise(legend, fedlora)
    assert summary["legend_time_to_fedlora_final"] == 20.0
    assert summary["fedlora_time_to_fedlora_final"] == 30.0
    assert summary["lone_deeper_every_round"] is False
