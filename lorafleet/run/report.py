"""``report.json``: what a run did, built from the state store (so any process can write it)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lorafleet import __version__
from lorafleet.run.federated import federated_entry
from lorafleet.run.round_numbers import parse_round
from lorafleet.state.base import StateStore
from schemas.config import RoundsConfig, RunConfig

REPORT_VERSION = 1
log = logging.getLogger(__name__)


def build_report(config: RunConfig, state: StateStore) -> dict[str, Any]:
    """The report of ``config.run_id`` as a JSON-serialisable dict (format in README.md)."""
    run_id = config.run_id
    fields = state.get_run_fields(run_id)
    final_round = int(fields.get("final_round", 0))
    metrics = state.get_round_metrics(run_id)
    rounds = [_round_entry(n, m) for n, m in sorted(metrics.items()) if 0 < n <= final_round]
    for entry in rounds:
        groups = metrics[entry["round"]].get("groups")
        if groups:  # a hierarchical run's global round: its plan and what each group did
            entry["groups"] = _groups_entry(groups, metrics[entry["round"]])
    counters = state.get_counters(run_id)
    target = config.rounds.target_value
    # what every device shared of its labels (all run one configuration): the mode and its epsilon
    privacy = {
        "label_histogram": config.privacy.label_histogram,
        "epsilon": config.privacy.epsilon if config.privacy.label_histogram == "noisy" else None,
    }
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "lorafleet_version": __version__,
        "run_id": run_id,
        "strategy": config.strategy,
        # which device times the plans and the virtual clock used: the emulated profiles' ("emulated",
        # deterministic for a seed) or what the devices measured ("measured": real seconds)
        "times": config.device_times,
        "config": config.model_dump(mode="json"),
        "rounds": rounds,
        "final_round": final_round,
        "final_accuracy": fields.get("final_accuracy"),
        "final_federated_accuracy": federated_entry(metrics.get(final_round, {}))["federated_accuracy"],
        "finish_reason": fields.get("finish_reason"),
        "wall_time_s": fields.get("wall_time_s"),
        "virtual_time_s": rounds[-1]["virtual_time_s"] if rounds else 0.0,
        "bytes_total": sum(r["bytes_up"] + r["bytes_down"] for r in rounds),
        "time_to_target": None if target is None else time_to_target(rounds, config.rounds),
        "devices_registered": state.count_devices(run_id),
        "updates": {
            k.removeprefix("update_"): v for k, v in sorted(counters.items()) if k.startswith("update_")
        },
        "rejected": {
            k.removeprefix("rejected_"): v for k, v in sorted(counters.items()) if k.startswith("rejected_")
        },
        "tasks_failed": counters.get("task_failed", 0),
        "tasks_dropped": counters.get("task_dropped", 0),
        "tasks_purged": counters.get("tasks_purged", 0),
        "state_restored": counters.get("state_restored", 0),  # lorafleet/run/recovery.py
        "devices": {
            d: {
                "num_samples": info.get("num_samples"),
                "label_histogram": info.get("label_histogram"),
                "tier": (info.get("profile") or {}).get("tier"),
                "eval_samples": info.get("eval_samples", 0),
                "privacy": privacy,
            }
            for d, info in sorted(state.get_devices(run_id).items())
        },
    }
    if config.hierarchical:
        report["group_rounds"] = [
            {
                **_round_entry(n, m),
                "global_round": m.get("global_round"),
                "group": m.get("group"),
                "step": m.get("step"),
            }
            for n, m in sorted(metrics.items())
            if (parsed := parse_round(n)) is not None and parsed.global_round <= final_round
        ]
        report["hierarchy"] = hierarchy_counters(state, run_id)
        report["replans_on_drift"] = counters.get("replan_drift", 0)
    return report


def hierarchy_counters(state: StateStore, run_id: str) -> dict[str, Any]:
    """The group and global aggregation counters of a hierarchical run, as the state store has them."""
    global_rounds = []
    for h in state.list_global_rounds(run_id):
        info = state.get_global_round(run_id, h)
        if info is not None:
            global_rounds.append(
                {
                    "global_round": h,
                    "status": info.status,
                    "targets": {str(g): t for g, t in sorted(info.targets.items())},
                    "counts": {str(g): c for g, c in sorted(info.counts.items())},
                }
            )
    return {"global_aggregations": state.global_aggregations(run_id), "global_rounds": global_rounds}


def _groups_entry(groups: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    done = m.get("group_rounds", {})
    virtual = m.get("group_virtual_s", {})
    return {
        g: {
            "devices": plan.get("devices"),
            "depth": plan.get("depth"),
            "frequency": plan.get("frequency"),
            "rounds_done": done.get(g),
            "planned_round_s": plan.get("round_s"),
            "virtual_s": virtual.get(g),
            "divergence": plan.get("divergence"),
        }
        for g, plan in sorted(groups.items(), key=lambda kv: int(kv[0]))
    }


def _round_entry(round_no: int, m: dict[str, Any]) -> dict[str, Any]:
    return {
        "round": round_no,
        "accuracy": m.get("accuracy"),
        "loss": m.get("loss"),
        "wall_time_s": m.get("wall_time_s"),
        "virtual_time_s": m.get("virtual_time_s"),
        "virtual_round_s": m.get("virtual_round_s"),
        "planned_round_s": m.get("planned_round_s"),
        "depths": m.get("depths"),
        "bytes_up": int(m.get("bytes_up", 0)),
        "bytes_down": int(m.get("bytes_down", 0)),
        "devices_reported": int(m.get("devices_reported", 0)),
        "tasks_issued": int(m.get("tasks_issued", 0)),
        "close_reason": m.get("close_reason"),
        "round_time_s": m.get("round_time_s"),
        "eval_s": m.get("eval_s"),
        **federated_entry(m),
    }


def time_to_target(rounds: list[dict[str, Any]], goal: RoundsConfig) -> dict[str, Any]:
    """When the run first reached its target (``rounds.target_metric`` at ``rounds.target_value``):
    virtual and wall seconds and total bytes by then. Every value is None when it never did."""
    spent = 0
    target = goal.target_value
    for entry in rounds:
        spent += entry["bytes_up"] + entry["bytes_down"]
        if goal.target_reached(entry["accuracy"], entry["loss"]):
            return {
                "target": target,
                "metric": goal.target_metric,
                "round": entry["round"],
                "virtual_s": entry["virtual_time_s"],
                "wall_s": entry["wall_time_s"],
                "bytes": spent,
            }
    none = {"round": None, "virtual_s": None, "wall_s": None, "bytes": None}
    return {"target": target, "metric": goal.target_metric, **none}


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.json`` and its figures, ``out_dir/report.png`` (lorafleet/run/plots.py);
    returns the JSON file's path. A figure that cannot be drawn is logged, never fails the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")  # the orchestrator and the aggregator share out_dir
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    from lorafleet.run.plots import plot_report  # matplotlib: loaded by the processes that write reports

    try:
        plot_report(report, out_dir / "report.png")
    except Exception:  # noqa: BLE001 - the report is written; its figure is a convenience
        log.exception("report: %s could not be drawn", out_dir / "report.png")
    return path
