"""Devices that were given a task and never reported: each gets a short deadline for its next task.

A device that holds its task without reporting (hung, or lying about being alive: its heartbeats go on)
keeps a round open until the round's deadline. The round that closed on its deadline without a device's
report marks it a no-show; its next task gets ``rounds.no_show_deadline_s`` instead of the round's
deadline, after which the aggregator counts the task as reported empty (``task_no_show``), so the round
closes on quorum without it: the device shortens its own next deadline, not everyone's. A report clears
the mark.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def next_no_shows(
    previous: Iterable[str], tasks: Mapping[str, str], updates: Mapping[str, bytes], close_reason: str | None
) -> set[str]:
    """The no-shows after a round: ``tasks`` task -> device, ``updates`` task -> stored report (empty:
    reported empty). A device with a real report is cleared; one without any report in a round closed
    on its deadline is marked; one reported empty for it stays as it was."""
    out = set(previous)
    for task, device in tasks.items():
        body = updates.get(task)
        if body:
            out.discard(device)
        elif body is None and close_reason == "deadline":
            out.add(device)
    return out


def task_deadlines_ms(
    tasks: Mapping[str, str], no_shows: Iterable[str], now_ms: int, no_show_deadline_s: float
) -> dict[str, int]:
    """The short deadline (ms) of each task given to a no-show device."""
    marked = set(no_shows)
    deadline = now_ms + int(round(no_show_deadline_s * 1000.0))
    return {task: deadline for task, device in sorted(tasks.items()) if device in marked}
