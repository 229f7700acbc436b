"""Per-task deadlines shorter than their round's (no-show devices, orchestrator/no_shows.py).

The orchestrator writes them in the run's record when it opens a round; the tasks carry them, and the
aggregator counts a task reported empty once its deadline has passed without a report.
"""

from __future__ import annotations

from collections.abc import Mapping

FIELD = "task_deadlines"  # run field: {"round": r, "ms": {task id: deadline in ms}}


def record(round_no: int, deadlines_ms: Mapping[str, int]) -> dict[str, object]:
    return {"round": round_no, "ms": dict(deadlines_ms)}


def of_round(fields: Mapping[str, object], round_no: int) -> dict[str, int]:
    """The short deadlines of ``round_no``'s tasks, from the run's fields (none if another round's)."""
    value = fields.get(FIELD)
    if not isinstance(value, dict) or value.get("round") != round_no:
        return {}
    return {str(task): int(ms) for task, ms in dict(value.get("ms") or {}).items()}


def current(fields: Mapping[str, object]) -> tuple[int, dict[str, int]] | None:
    """(round, task deadlines) as the orchestrator last wrote them, if any."""
    value = fields.get(FIELD)
    if not isinstance(value, dict) or not value.get("ms"):
        return None
    round_no = int(value["round"])
    return round_no, of_round(fields, round_no)
