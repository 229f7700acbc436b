"""In-process twin of the Redis state store (the embedded mode's state).

Plain dictionaries under one lock; each method is atomic, as each Lua script is in Redis.
Values are JSON round-tripped where Redis would store JSON, so both stores return equal results.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import threading
from dataclasses import dataclass, field
from typing import Any, cast

from lorafleet.state.base import (
    CloseReason,
    GlobalRoundInfo,
    GlobalRoundStatus,
    GroupProgress,
    RecordOutcome,
    RecordResult,
    RoundInfo,
    RoundStatus,
    StateStoreError,
)


@dataclass
class _Round:
    tasks: dict[str, str]
    specs: dict[str, str]
    quorum: int
    deadline_ms: int
    opened_ms: int
    status: RoundStatus = "open"
    updates: dict[str, bytes] = field(default_factory=dict)
    closed_ms: int | None = None
    close_reason: CloseReason | None = None
    global_version: int | None = None


@dataclass
class _GlobalRound:
    targets: dict[int, int]
    counts: dict[int, int]
    counted: set[int] = field(default_factory=set)
    status: GlobalRoundStatus = "open"


@dataclass
class _Run:
    fields: dict[str, str] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)
    rounds: dict[int, _Round] = field(default_factory=dict)
    global_adapter: tuple[int, bytes] | None = None
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    global_rounds: dict[int, _GlobalRound] = field(default_factory=dict)
    global_count: int = 0
    group_adapters: dict[int, tuple[int, bytes]] = field(default_factory=dict)


_SNAPSHOT_TAG = b"lorafleet-memory-snapshot-1\n"


class _SnapshotUnpickler(pickle.Unpickler):
    """Loads only this module's records and plain containers: a snapshot file is data, never code."""

    _ALLOWED = frozenset({(__name__, "_Run"), (__name__, "_Round"), (__name__, "_GlobalRound"),
                          ("builtins", "set"), ("builtins", "frozenset")})  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"a snapshot may not hold {module}.{name}")
        return super().find_class(module, name)


class InMemoryStateStore:
    """Thread-safe in-process :class:`lorafleet.state.base.StateStore`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._runs: dict[str, _Run] = {}

    def _run(self, run_id: str) -> _Run:
        return self._runs.setdefault(run_id, _Run())

    # -- run ----------------------------------------------------------------------------------------
    def put_run_field(self, run_id: str, name: str, value: Any) -> None:
        with self._lock:
            self._run(run_id).fields[name] = json.dumps(value)

    def get_run_fields(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            return {k: json.loads(v) for k, v in self._run(run_id).fields.items()}

    # -- devices ------------------------------------------------------------------------------------
    def register_device(self, run_id: str, device_id: str, info: dict[str, Any]) -> bool:
        with self._lock:
            devices = self._run(run_id).devices
            new = device_id not in devices
            devices[device_id] = json.dumps(info)
            return new

    def get_devices(self, run_id: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {d: json.loads(v) for d, v in self._run(run_id).devices.items()}

    def get_device(self, run_id: str, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            raw = self._run(run_id).devices.get(device_id)
        return None if raw is None else cast(dict[str, Any], json.loads(raw))

    def count_devices(self, run_id: str) -> int:
        with self._lock:
            return len(self._run(run_id).devices)

    def touch_device(self, run_id: str, device_id: str, expires_ms: int) -> None:
        with self._lock:
            self._run(run_id).leases[device_id] = int(expires_ms)

    def expired_devices(self, run_id: str, now_ms: int) -> list[str]:
        with self._lock:
            leases = self._run(run_id).leases
            return sorted(d for d, t in leases.items() if t <= now_ms)

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
        if quorum < 1:
            raise ValueError("quorum must be at least 1")
        with self._lock:
            rounds = self._run(run_id).rounds
            if round_no in rounds:
                return False
            rounds[round_no] = _Round(dict(tasks), dict(specs), int(quorum), int(deadline_ms), int(now_ms))
            return True

    def get_round(self, run_id: str, round_no: int) -> RoundInfo | None:
        with self._lock:
            rnd = self._run(run_id).rounds.get(round_no)
            if rnd is None:
                return None
            return RoundInfo(
                run_id=run_id,
                round=round_no,
                status=rnd.status,
                tasks=dict(rnd.tasks),
                quorum=rnd.quorum,
                deadline_ms=rnd.deadline_ms,
                opened_ms=rnd.opened_ms,
                reported=len(rnd.updates),
                closed_ms=rnd.closed_ms,
                close_reason=rnd.close_reason,
                global_version=rnd.global_version,
            )

    def list_rounds(self, run_id: str) -> list[int]:
        with self._lock:
            return sorted(self._run(run_id).rounds)

    def get_task_spec(self, run_id: str, round_no: int, task_id: str) -> str | None:
        with self._lock:
            rnd = self._run(run_id).rounds.get(round_no)
            return None if rnd is None else rnd.specs.get(task_id)

    def record_update(
        self, run_id: str, round_no: int, task_id: str, device_id: str, update: bytes, now_ms: int
    ) -> RecordResult:
        with self._lock:
            run = self._run(run_id)
            rnd = run.rounds.get(round_no)
            outcome: RecordOutcome
            closed_now = False
            if rnd is None or task_id not in rnd.tasks:
                outcome = "unknown_task"
            elif rnd.tasks[task_id] != device_id:
                outcome = "wrong_device"
            elif task_id in rnd.updates and (rnd.updates[task_id] or not update):
                outcome = "duplicate"
            elif rnd.status != "open":
                outcome = "late"
            elif task_id in rnd.updates:
                outcome = "recovered"  # a real update for a task reported empty, the round still open
                rnd.updates[task_id] = bytes(update)
            else:
                outcome = "counted"
                rnd.updates[task_id] = bytes(update)
                if len(rnd.updates) >= rnd.quorum:
                    self._close(rnd, "quorum", now_ms)
                    closed_now = True
            name = f"update_{outcome}"
            run.counters[name] = run.counters.get(name, 0) + 1
            return RecordResult(outcome, 0 if rnd is None else len(rnd.updates), closed_now)

    @staticmethod
    def _close(rnd: _Round, reason: CloseReason, now_ms: int) -> None:
        rnd.status = "closed"
        rnd.close_reason = reason
        rnd.closed_ms = int(now_ms)

    def close_expired_rounds(self, run_id: str, now_ms: int) -> list[int]:
        with self._lock:
            closed = []
            for round_no, rnd in sorted(self._run(run_id).rounds.items()):
                if rnd.status == "open" and rnd.deadline_ms <= now_ms:
                    self._close(rnd, "deadline", now_ms)
                    closed.append(round_no)
            return closed

    def pending_aggregations(self, run_id: str) -> list[int]:
        with self._lock:
            return sorted(n for n, r in self._run(run_id).rounds.items() if r.status == "closed")

    def get_updates(self, run_id: str, round_no: int) -> dict[str, bytes]:
        with self._lock:
            rnd = self._run(run_id).rounds.get(round_no)
            return {} if rnd is None else dict(rnd.updates)

    def get_update(self, run_id: str, round_no: int, task_id: str) -> bytes | None:
        with self._lock:
            rnd = self._run(run_id).rounds.get(round_no)
            return None if rnd is None else rnd.updates.get(task_id)

    def compact_updates(self, run_id: str, round_no: int, receipts: dict[str, bytes]) -> bool:
        with self._lock:
            rnd = self._run(run_id).rounds.get(round_no)
            if rnd is None or rnd.status != "aggregated":
                return False
            for task, receipt in receipts.items():
                if rnd.updates.get(task) and receipt:
                    rnd.updates[task] = bytes(receipt)
            return True

    def mark_aggregated(self, run_id: str, round_no: int, global_version: int) -> bool:
        with self._lock:
            rnd = self._run(run_id).rounds.get(round_no)
            if rnd is None or rnd.status != "closed":
                return False
            rnd.status = "aggregated"
            rnd.global_version = int(global_version)
            return True

    # -- hierarchy ----------------------------------------------------------------------------------
    def open_global_round(self, run_id: str, global_round: int, targets: dict[int, int]) -> bool:
        if not targets or any(t < 1 for t in targets.values()):
            raise ValueError(f"a global round needs groups with targets >= 1, got {targets}")
        with self._lock:
            rounds = self._run(run_id).global_rounds
            if global_round in rounds:
                return False
            rounds[global_round] = _GlobalRound(
                {int(g): int(t) for g, t in targets.items()}, dict.fromkeys(map(int, targets), 0)
            )
            return True

    def _progress(
        self, run: _Run, global_round: int, group: int, *, counted: bool, was_open: bool
    ) -> GroupProgress:
        gr = run.global_rounds[global_round]
        ready_now = False
        if was_open and gr.status == "open" and all(gr.counts[g] >= t for g, t in gr.targets.items()):
            gr.status = "ready"
            ready_now = True
        return GroupProgress(global_round, group, gr.counts[group], gr.targets[group], counted, ready_now)

    def record_group_aggregation(
        self, run_id: str, global_round: int, group: int, round_no: int
    ) -> GroupProgress:
        with self._lock:
            run = self._run(run_id)
            gr = run.global_rounds.get(global_round)
            if gr is None or group not in gr.targets:
                return GroupProgress(global_round, group, 0, 0, False, False)
            counted = round_no not in gr.counted
            if counted:
                gr.counted.add(round_no)
                gr.counts[group] += 1
            return self._progress(run, global_round, group, counted=counted, was_open=True)

    def set_group_target(self, run_id: str, global_round: int, group: int, target: int) -> GroupProgress:
        with self._lock:
            run = self._run(run_id)
            gr = run.global_rounds.get(global_round)
            if gr is None or group not in gr.targets:
                return GroupProgress(global_round, group, 0, 0, False, False)
            if gr.status == "open":
                gr.targets[group] = max(int(target), gr.counts[group], 1)
            return self._progress(run, global_round, group, counted=False, was_open=True)

    def get_global_round(self, run_id: str, global_round: int) -> GlobalRoundInfo | None:
        with self._lock:
            gr = self._run(run_id).global_rounds.get(global_round)
            if gr is None:
                return None
            return GlobalRoundInfo(run_id, global_round, gr.status, dict(gr.targets), dict(gr.counts))

    def list_global_rounds(self, run_id: str) -> list[int]:
        with self._lock:
            return sorted(self._run(run_id).global_rounds)

    def pending_global_aggregations(self, run_id: str) -> list[int]:
        with self._lock:
            return sorted(h for h, gr in self._run(run_id).global_rounds.items() if gr.status == "ready")

    def mark_global_aggregated(self, run_id: str, global_round: int) -> bool:
        with self._lock:
            run = self._run(run_id)
            gr = run.global_rounds.get(global_round)
            if gr is None or gr.status != "ready":
                return False
            gr.status = "aggregated"
            run.global_count += 1
            return True

    def global_aggregations(self, run_id: str) -> int:
        with self._lock:
            return self._run(run_id).global_count

    def put_group_adapter(self, run_id: str, group: int, version: int, data: bytes) -> None:
        with self._lock:
            adapters = self._run(run_id).group_adapters
            current = adapters.get(group)
            if current is None or current[0] <= version:
                adapters[group] = (int(version), bytes(data))

    def get_group_adapter(self, run_id: str, group: int) -> tuple[int, bytes] | None:
        with self._lock:
            return self._run(run_id).group_adapters.get(group)

    # -- global adapter -----------------------------------------------------------------------------
    def put_global_adapter(self, run_id: str, version: int, data: bytes) -> None:
        with self._lock:
            run = self._run(run_id)
            if run.global_adapter is None or run.global_adapter[0] <= version:
                run.global_adapter = (int(version), bytes(data))

    def get_global_adapter(self, run_id: str) -> tuple[int, bytes] | None:
        with self._lock:
            return self._run(run_id).global_adapter

    # -- metrics and counters ----------------------------------------------------------------------
    def put_round_metrics(self, run_id: str, round_no: int, metrics: dict[str, Any]) -> None:
        with self._lock:
            current = self._run(run_id).metrics.setdefault(round_no, {})
            current.update(json.loads(json.dumps(metrics)))

    def get_round_metrics(self, run_id: str) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {n: dict(m) for n, m in sorted(self._run(run_id).metrics.items())}

    def incr_counter(self, run_id: str, name: str, amount: int = 1) -> int:
        with self._lock:
            counters = self._run(run_id).counters
            counters[name] = counters.get(name, 0) + int(amount)
            return counters[name]

    def get_counters(self, run_id: str) -> dict[str, int]:
        with self._lock:
            return dict(self._run(run_id).counters)

    def delete_run(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def expire_run(self, run_id: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            self.delete_run(run_id)

    def list_runs(self) -> list[str]:
        with self._lock:
            return sorted(run_id for run_id, run in self._runs.items() if run.fields)

    def export_run(self, run_id: str) -> bytes:
        with self._lock:
            return _SNAPSHOT_TAG + pickle.dumps((run_id, copy.deepcopy(self._run(run_id))))

    def import_run(self, run_id: str, snapshot: bytes) -> None:
        if not snapshot.startswith(_SNAPSHOT_TAG):
            raise StateStoreError("import_run: not a snapshot of the in-process state store")
        try:
            owner, run = _SnapshotUnpickler(io.BytesIO(snapshot[len(_SNAPSHOT_TAG) :])).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise StateStoreError(f"import_run: unreadable snapshot: {exc}") from exc
        if owner != run_id or not isinstance(run, _Run):
            raise StateStoreError(f"import_run: not a snapshot of run {run_id!r}")
        with self._lock:
            self._runs[run_id] = run

    def close(self) -> None:
        """Nothing to release."""
