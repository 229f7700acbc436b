"""The StateStore port: run bookkeeping that must survive service restarts.

Two implementations hold to one contract (tests/contract/test_state_contract.py):
:class:`lorafleet.state.memory.InMemoryStateStore` (embedded mode) and
:class:`lorafleet.state.redis.RedisStateStore` (Redis, atomic Lua scripts).

The round protocol:

1. The orchestrator ``open_round``s with the tasks it issued (task id -> device id), a quorum and a
   deadline, then publishes the tasks.
2. The aggregator ``record_update``s each validated update. Recording is idempotent per task id
   and, in the same atomic step, closes the round when the quorum is reached. Exactly one call
   over the round's life sees ``closed_now=True``.
3. ``close_expired_rounds`` closes open rounds whose deadline passed (exactly once, whoever calls).
4. A closed round waits in ``pending_aggregations`` until the aggregator ``mark_aggregated``s it,
   so a crash between closing and aggregating loses nothing.

Times are integer milliseconds passed in by the caller (services share one clock seam).

Hierarchical runs (HierFedLoRA-style groups) add a *global round* above the rounds: the orchestrator
``open_global_round``s it with each group's target number of intra-group aggregations; every
intra-group round is an ordinary round as above. After aggregating one, the aggregator
``record_group_aggregation``s it: counted once per round, atomically with the check whether every
group has reached its target, which makes the global round *ready* exactly once and puts it in
``pending_global_aggregations`` until ``mark_global_aggregated`` (which counts the global
aggregation, once). ``set_group_target`` changes a target during the global round (a replan); it
never goes below the group's count, and it can make the round ready too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from schemas.errors import StateStoreError as StateStoreError  # re-exported: the port names its errors

RecordOutcome = Literal["counted", "recovered", "duplicate", "late", "unknown_task", "wrong_device"]
RoundStatus = Literal["open", "closed", "aggregated"]
CloseReason = Literal["quorum", "deadline"]


GlobalRoundStatus = Literal["open", "ready", "aggregated"]


@dataclass(frozen=True)
class RecordResult:
    outcome: RecordOutcome
    reported: int  # updates counted in the round so far, this one included
    closed_now: bool  # this call closed the round


@dataclass(frozen=True)
class RoundInfo:
    run_id: str
    round: int
    status: RoundStatus
    tasks: dict[str, str]  # task_id -> device_id
    quorum: int
    deadline_ms: int
    opened_ms: int
    reported: int
    closed_ms: int | None
    close_reason: CloseReason | None
    global_version: int | None


@dataclass(frozen=True)
class GroupProgress:
    global_round: int
    group: int
    count: int  # intra-group aggregations counted in this global round
    target: int  # the group's target frequency
    counted: bool  # this call counted the round (False: counted before, or an unknown group/round)
    ready_now: bool  # this call made the global round ready


@dataclass(frozen=True)
class GlobalRoundInfo:
    run_id: str
    global_round: int
    status: GlobalRoundStatus
    targets: dict[int, int]  # group -> target frequency
    counts: dict[int, int]  # group -> intra-group aggregations counted


class StateStore(Protocol):
    # -- run ----------------------------------------------------------------------------------------
    def put_run_field(self, run_id: str, name: str, value: Any) -> None:
        """Store one JSON-serialisable field of the run record."""
        ...

    def get_run_fields(self, run_id: str) -> dict[str, Any]: ...

    # -- devices ------------------------------------------------------------------------------------
    def register_device(self, run_id: str, device_id: str, info: dict[str, Any]) -> bool:
        """Record a device (info is JSON-serialisable); True if it was not registered before."""
        ...

    def get_devices(self, run_id: str) -> dict[str, dict[str, Any]]: ...
    def get_device(self, run_id: str, device_id: str) -> dict[str, Any] | None:
        """One registered device's info (None if it is not registered): O(1), unlike get_devices."""
        ...

    def count_devices(self, run_id: str) -> int:
        """How many devices are registered, without reading them."""
        ...

    def touch_device(self, run_id: str, device_id: str, expires_ms: int) -> None:
        """Extend a device's liveness lease to ``expires_ms``."""
        ...

    def expired_devices(self, run_id: str, now_ms: int) -> list[str]:
        """Devices whose lease ended at or before ``now_ms``."""
        ...

    # -- rounds -------------------------------------------------------------------------------------
    def open_round(
        self,
        run_id: str,
        round_no: int,
        tasks: dict[str, str],
        specs: dict[str, str],
        quorum: int,
        deadline_ms: int,
        now_ms: int,
    ) -> bool:
        """Open a round (idempotent: False and no change if it was opened before)."""
        ...

    def get_round(self, run_id: str, round_no: int) -> RoundInfo | None: ...
    def list_rounds(self, run_id: str) -> list[int]: ...
    def get_task_spec(self, run_id: str, round_no: int, task_id: str) -> str | None: ...
    def record_update(
        self, run_id: str, round_no: int, task_id: str, device_id: str, update: bytes, now_ms: int
    ) -> RecordResult:
        """Count an update once per task id and close the round on quorum, atomically.

        Outcomes: ``counted`` (stored), ``recovered`` (the task was reported empty, its device
        dropped or failed, and this real update replaces the empty report while the round is still
        open: the round's count is unchanged), ``duplicate`` (task already counted), ``late`` (round
        no longer open, also for a real update of a task reported empty), ``unknown_task`` (no such
        task in the round, or no such round), ``wrong_device`` (task issued to another device).
        Every outcome increments the run counter ``update_<outcome>``.
        """
        ...

    def close_expired_rounds(self, run_id: str, now_ms: int) -> list[int]:
        """Close open rounds whose deadline is at or before ``now_ms``; return those this call closed."""
        ...

    def pending_aggregations(self, run_id: str) -> list[int]:
        """Closed rounds not yet aggregated, ascending."""
        ...

    def get_updates(self, run_id: str, round_no: int) -> dict[str, bytes]:
        """The counted updates of a round: task_id -> stored bytes."""
        ...

    def get_update(self, run_id: str, round_no: int, task_id: str) -> bytes | None:
        """One counted update of a round (its stored bytes), None if the task has not reported."""
        ...

    def compact_updates(self, run_id: str, round_no: int, receipts: dict[str, bytes]) -> bool:
        """Replace an *aggregated* round's stored updates by small receipts (task_id -> bytes, each
        non-empty and for a task stored non-empty), so the state store does not grow with every
        round's tensors; False (and nothing changed) unless the round is aggregated."""
        ...

    def mark_aggregated(self, run_id: str, round_no: int, global_version: int) -> bool:
        """Mark a closed round aggregated; True the first time (idempotent)."""
        ...

    # -- hierarchy (global rounds over groups) ------------------------------------------------------
    def open_global_round(self, run_id: str, global_round: int, targets: dict[int, int]) -> bool:
        """Open a global round with each group's target frequency (idempotent: False if opened before).

        Raises:
            ValueError: no groups, or a target below 1.
        """
        ...

    def record_group_aggregation(
        self, run_id: str, global_round: int, group: int, round_no: int
    ) -> GroupProgress:
        """Count intra-group round ``round_no`` of ``group`` once, and make the global round ready when
        every group has reached its target (exactly once over the global round's life)."""
        ...

    def set_group_target(self, run_id: str, global_round: int, group: int, target: int) -> GroupProgress:
        """Change an open global round's target for ``group`` (never below its count; may make the
        round ready); no effect on a round that is ready or aggregated."""
        ...

    def get_global_round(self, run_id: str, global_round: int) -> GlobalRoundInfo | None: ...
    def list_global_rounds(self, run_id: str) -> list[int]: ...
    def pending_global_aggregations(self, run_id: str) -> list[int]:
        """Ready global rounds not yet aggregated, ascending."""
        ...

    def mark_global_aggregated(self, run_id: str, global_round: int) -> bool:
        """Mark a ready global round aggregated and count it; True the first time (idempotent)."""
        ...

    def global_aggregations(self, run_id: str) -> int:
        """How many global rounds were aggregated."""
        ...

    def put_group_adapter(self, run_id: str, group: int, version: int, data: bytes) -> None:
        """Store a group's adapter unless a newer version of it is stored."""
        ...

    def get_group_adapter(self, run_id: str, group: int) -> tuple[int, bytes] | None: ...

    # -- global adapter -----------------------------------------------------------------------------
    def put_global_adapter(self, run_id: str, version: int, data: bytes) -> None:
        """Store the global adapter unless a newer version is already stored."""
        ...

    def get_global_adapter(self, run_id: str) -> tuple[int, bytes] | None: ...

    # -- metrics and counters ----------------------------------------------------------------------
    def put_round_metrics(self, run_id: str, round_no: int, metrics: dict[str, Any]) -> None:
        """Merge JSON-serialisable metrics into a round's record."""
        ...

    def get_round_metrics(self, run_id: str) -> dict[int, dict[str, Any]]: ...
    def incr_counter(self, run_id: str, name: str, amount: int = 1) -> int: ...
    def get_counters(self, run_id: str) -> dict[str, int]: ...

    def delete_run(self, run_id: str) -> None:
        """Remove every record of a run."""
        ...

    def expire_run(self, run_id: str, ttl_s: float) -> None:
        """Let every record of a run that this client may write expire ``ttl_s`` seconds from now (0
        or less: delete them all now); a record written after the call does not expire. Under the
        Redis ACL users each service may write only its part (lorafleet/run/retention.py). The
        in-memory twin, which lives as long as its process, forgets a run at 0 only."""
        ...

    def list_runs(self) -> list[str]:
        """The ids of the runs whose run fields the store holds, sorted."""
        ...

    # -- snapshots (lorafleet/run/recovery.py) -----------------------------------------------------
    def export_run(self, run_id: str) -> bytes:
        """Every record of a run, as one opaque blob that :meth:`import_run` of the same kind of store
        takes back (a consistent point in time: no write of the run lands halfway through it)."""
        ...

    def import_run(self, run_id: str, snapshot: bytes) -> None:
        """Replace every record of a run by an :meth:`export_run` blob, atomically.

        Raises:
            StateStoreError: the blob is not a snapshot of this kind of store.
        """
        ...

    def close(self) -> None: ...
