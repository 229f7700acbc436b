"""A running (or finished) experiment's state, read from the state store: ``lorafleet status``."""

from __future__ import annotations

import time
from typing import Any

from lorafleet.run.report import hierarchy_counters
from lorafleet.run.round_numbers import parse_round
from lorafleet.state.base import StateStore


def run_status(state: StateStore, run_id: str, now_ms: int | None = None) -> dict[str, Any]:
    """Where run ``run_id`` is: its status and round, devices and leases, open rounds, counters and,
    for hierarchical runs, each group's aggregation count against its target and the global count.

    Raises:
        LookupError: the state store knows no such run.
    """
    fields = state.get_run_fields(run_id)
    if not fields:
        raise LookupError(f"no run {run_id!r} in the state store")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    config = fields.get("config") or {}
    devices = state.get_devices(run_id)
    open_rounds = []
    for r in state.list_rounds(run_id)[-200:]:
        info = state.get_round(run_id, r)
        if info is not None and info.status != "aggregated":
            parsed = parse_round(r)
            open_rounds.append(
                {
                    "round": r,
                    "status": info.status,
                    "reported": info.reported,
                    "tasks": len(info.tasks),
                    "quorum": info.quorum,
                    **({} if parsed is None else parsed._asdict()),
                }
            )
    out: dict[str, Any] = {
        "run_id": run_id,
        "status": fields.get("status"),
        "strategy": config.get("strategy"),
        "round": fields.get("round"),
        "max_rounds": (config.get("rounds") or {}).get("max_rounds"),
        "finish_reason": fields.get("finish_reason"),
        "final_accuracy": fields.get("final_accuracy"),
        "devices_registered": len(devices),
        "devices_lease_expired": len(state.expired_devices(run_id, now_ms)),
        "open_rounds": open_rounds,
        "counters": dict(sorted(state.get_counters(run_id).items())),
    }
    if state.list_global_rounds(run_id):
        out["hierarchy"] = hierarchy_counters(state, run_id)
    return out
