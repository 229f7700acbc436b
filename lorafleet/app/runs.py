"""The runs a state store holds, one line each: ``lorafleet runs``."""

from __future__ import annotations

from typing import Any

from lorafleet.run.stopping import stop_requested
from lorafleet.state.base import StateStore


def list_runs(state: StateStore) -> list[dict[str, Any]]:
    """Every run of ``state``: its id, status (``stopping`` once a stop is asked and it runs on),
    strategy, round of max rounds, finish reason, and accuracy (the final one, else the latest
    evaluated round's)."""
    rows = []
    for run_id in state.list_runs():
        fields = state.get_run_fields(run_id)
        if not fields:  # expired or deleted since the listing
            continue
        config = fields.get("config") or {}
        status = fields.get("status")
        if status == "running" and stop_requested(fields):
            status = "stopping"
        accuracy = fields.get("final_accuracy")
        if accuracy is None:
            evaluated = [m for _, m in sorted(state.get_round_metrics(run_id).items()) if "accuracy" in m]
            accuracy = evaluated[-1]["accuracy"] if evaluated else None
        rows.append(
            {
                "run_id": run_id,
                "status": status,
                "strategy": config.get("strategy"),
                "round": fields.get("round"),
                "max_rounds": (config.get("rounds") or {}).get("max_rounds"),
                "finish_reason": fields.get("finish_reason"),
                "accuracy": accuracy,
            }
        )
    return rows
