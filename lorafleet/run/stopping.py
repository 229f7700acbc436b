"""Stopping a run from outside and taking it up again.

``lorafleet stop RUN_ID`` sets :data:`STOP_FIELD` in the run's fields; the orchestrator reads it when
a round has been aggregated and finishes after that round's evaluation with reason ``stopped``: the
report and the final adapter are written as for any finish. ``lorafleet run --resume`` calls
:func:`reopen_run` first: a stopped run is marked running again, and the services resume it from the
state store (or from the aggregator's snapshots, lorafleet/run/recovery.py) at the round after.
"""

from __future__ import annotations

from typing import Any

from lorafleet.state.base import StateStore

#: the run field that asks the orchestrator to finish after the current round
STOP_FIELD = "stop_requested"


def stop_requested(fields: dict[str, Any]) -> bool:
    """Whether the run's fields ask it to stop."""
    return bool(fields.get(STOP_FIELD))


def request_stop(state: StateStore, run_id: str) -> str:
    """Ask a run to finish after its current round; returns its status (a finished run is left as is).

    Raises:
        LookupError: the store holds no such run.
    """
    fields = state.get_run_fields(run_id)
    if not fields:
        raise LookupError(f"no run {run_id!r} in the state store")
    status = str(fields.get("status"))
    if status != "finished":
        state.put_run_field(run_id, STOP_FIELD, True)
    return status


def reopen_run(state: StateStore, run_id: str) -> bool:
    """Take a run that was stopped (or asked to) up again: the stop request cleared and, if it finished
    on it, the run marked running at its last round; returns whether it was stopped."""
    fields = state.get_run_fields(run_id)
    was_stopped = stop_requested(fields) or fields.get("finish_reason") == "stopped"
    if stop_requested(fields):
        state.put_run_field(run_id, STOP_FIELD, False)
    if fields.get("status") == "finished" and fields.get("finish_reason") == "stopped":
        state.put_run_field(run_id, "finish_reason", None)
        state.put_run_field(run_id, "status", "running")
    return was_stopped
