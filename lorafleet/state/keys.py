"""Every Redis key lorafleet uses. Keys of one run share the hash tag ``{run}`` (Redis Cluster safe)."""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "lf"


def _run(run_id: str) -> str:
    return f"{PREFIX}:{{{run_id}}}"


def run_meta(run_id: str) -> str:
    """HASH field -> JSON: run configuration, status, orchestrator cursor."""
    return f"{_run(run_id)}:meta"


def devices(run_id: str) -> str:
    """HASH device_id -> JSON device info (registration)."""
    return f"{_run(run_id)}:devices"


def leases(run_id: str) -> str:
    """ZSET device_id -> lease expiry (ms)."""
    return f"{_run(run_id)}:leases"


def rounds_index(run_id: str) -> str:
    """ZSET round -> round number (every round ever opened)."""
    return f"{_run(run_id)}:rounds"


def round_state(run_id: str, round_no: int) -> str:
    """HASH status, quorum, deadline_ms, opened_ms, closed_ms, close_reason, reported, global_version."""
    return f"{_run(run_id)}:round:{round_no}:state"


def round_tasks(run_id: str, round_no: int) -> str:
    """HASH task_id -> device_id of the tasks issued in a round."""
    return f"{_run(run_id)}:round:{round_no}:tasks"


def round_specs(run_id: str, round_no: int) -> str:
    """HASH task_id -> opaque task spec (JSON) the aggregator validates updates against."""
    return f"{_run(run_id)}:round:{round_no}:specs"


def round_updates(run_id: str, round_no: int) -> str:
    """HASH task_id -> stored update bytes (only counted updates)."""
    return f"{_run(run_id)}:round:{round_no}:updates"


def open_deadlines(run_id: str) -> str:
    """ZSET round -> deadline (ms) of rounds still open."""
    return f"{_run(run_id)}:deadlines"


def pending_aggregations(run_id: str) -> str:
    """ZSET round -> round number of rounds closed but not yet aggregated (the outbox)."""
    return f"{_run(run_id)}:pending"


def global_adapter(run_id: str) -> str:
    """HASH version, data: the latest global adapter."""
    return f"{_run(run_id)}:global"


def global_round_state(run_id: str, global_round: int) -> str:
    """HASH status, target:<group>, count:<group>, counted:<round> (nonce), ready_by, aggregated_by."""
    return f"{_run(run_id)}:global:{global_round}:state"


def global_rounds_index(run_id: str) -> str:
    """ZSET global round -> global round number (every global round ever opened)."""
    return f"{_run(run_id)}:global:index"


def pending_global(run_id: str) -> str:
    """ZSET global round -> number of global rounds ready but not yet aggregated (the outbox)."""
    return f"{_run(run_id)}:global:pending"


def hierarchy(run_id: str) -> str:
    """HASH global_count: global aggregations done."""
    return f"{_run(run_id)}:hierarchy"


def group_adapter(run_id: str, group: int) -> str:
    """HASH version, data: a group's latest adapter."""
    return f"{_run(run_id)}:group:{group}:adapter"


def round_metrics(run_id: str) -> str:
    """HASH round -> JSON metrics of that round."""
    return f"{_run(run_id)}:metrics"


def counters(run_id: str) -> str:
    """HASH name -> integer counter (update outcomes, rejections per reason)."""
    return f"{_run(run_id)}:counters"


def run_keys(run_id: str, rounds: Iterable[int], global_rounds: Iterable[int], groups: int) -> list[str]:
    """Every key the run can have, given its rounds (:func:`rounds_index`), global rounds
    (:func:`global_rounds_index`) and the most groups it can have: what a snapshot lists without a
    SCAN, which the services' Redis ACL users may not send."""
    names = [
        run_meta(run_id),
        devices(run_id),
        leases(run_id),
        rounds_index(run_id),
        open_deadlines(run_id),
        pending_aggregations(run_id),
        global_adapter(run_id),
        global_rounds_index(run_id),
        pending_global(run_id),
        hierarchy(run_id),
        round_metrics(run_id),
        counters(run_id),
    ]
    for r in rounds:
        names += [round_state(run_id, r), round_tasks(run_id, r), round_specs(run_id, r)]
        names.append(round_updates(run_id, r))
    names += [global_round_state(run_id, g) for g in global_rounds]
    names += [group_adapter(run_id, g) for g in range(groups)]
    return names


def run_pattern(run_id: str) -> str:
    """Glob matching every key of a run (cleanup)."""
    return f"{_run(run_id)}:*"
