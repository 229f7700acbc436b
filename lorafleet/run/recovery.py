"""Getting a run back after its state store lost it, from snapshots beside the checkpoints.

The aggregator writes a snapshot of the run's state (:meth:`StateStore.export_run`) to
``OUT/state/round-NNNN.snapshot`` once the run is running and after every aggregation it checkpoints,
keeping the latest :data:`KEEP`. When the store loses the run (a Redis restart without persistence:
the epoch is gone) or rolls it back (a failover to a replica that missed writes: a fenced field is
behind), the aggregator imports the latest snapshot of the run's epoch and writes a new ``restored``
token; the orchestrator, which waited for that token, takes its view from the store again and goes on
from there: a round aggregated in the snapshot is never aggregated again, a round it had not opened
is opened again with the same tasks (task ids are deterministic), whose updates the workers send
again (a worker resends the update of a task it already did, or trains it again). An update the
aggregator had counted after the snapshot is accounted ``update_lost_with_state``; its resend is
counted in its place.

A service that starts against a store that does not have the run, with a snapshot of the run in its
output directory, restores that snapshot instead of beginning the run again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.run.clock import Clock
from lorafleet.run.epoch import EPOCH_FIELD, RESTORED_FIELD, EpochGuard, new_epoch
from lorafleet.state.base import StateStore
from schemas.errors import StateLost, StateStoreRefused

log = logging.getLogger(__name__)

KEEP = 2  # snapshots kept (the latest, and one in case the latest write was cut short)
WAIT_S = 60.0  # how long the orchestrator waits for the aggregator to restore a lost run


def snapshot_dir(out_dir: Path) -> Path:
    return out_dir / "state"


@dataclass(frozen=True)
class Snapshot:
    run_id: str
    epoch: str
    round_no: int  # the latest round aggregated when it was taken (0: before any)
    blob: bytes  # StateStore.export_run


def write_snapshot(run_id: str, epoch: str, round_no: int, blob: bytes, out_dir: Path) -> Path:
    """Write ``blob`` (:meth:`StateStore.export_run` of the run) atomically (a temporary file renamed
    into place); keep the latest :data:`KEEP` snapshots."""
    directory = snapshot_dir(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"run_id": run_id, "epoch": epoch, "round": round_no}).encode()
    path = directory / f"round-{round_no:06d}.snapshot"
    partial = path.with_suffix(".partial")
    with partial.open("wb") as file:
        file.write(header + b"\n" + blob)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)
    for old in sorted(directory.glob("round-*.snapshot"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def latest_snapshot(out_dir: Path | None, run_id: str, epoch: str | None = None) -> Snapshot | None:
    """The newest readable snapshot of ``run_id`` (of ``epoch``, when given) in ``out_dir``."""
    if out_dir is None or not snapshot_dir(out_dir).is_dir():
        return None
    for path in sorted(snapshot_dir(out_dir).glob("round-*.snapshot"), reverse=True):
        raw = path.read_bytes()
        head, sep, blob = raw.partition(b"\n")
        try:
            meta = json.loads(head)
            snapshot = Snapshot(str(meta["run_id"]), str(meta["epoch"]), int(meta["round"]), blob)
        except (ValueError, KeyError, TypeError):
            log.warning("recovery: %s is not a snapshot; skipped", path)
            continue
        if sep and snapshot.run_id == run_id and epoch in (None, snapshot.epoch):
            return snapshot
    return None


def restore(state: StateStore, snapshot: Snapshot, out_dir: Path | None = None) -> str:
    """Import ``snapshot`` and mark the run restored (a new token every service notices); the token.

    Raises:
        StateLost: the store refuses the restore to this service's user (a Redis ACL that keeps the
            services to their own keys): the message says how an operator restores it.
    """
    try:
        state.import_run(snapshot.run_id, snapshot.blob)
    except StateStoreRefused as refused:
        where = "OUT" if out_dir is None else str(out_dir)
        raise StateLost(
            f"the state store lost run {snapshot.run_id!r} and refuses this service's restore of its "
            f"snapshot of round {snapshot.round_no} ({refused}); restore it as a user that may write every "
            f"key of the run, then start the services again: lorafleet restore {snapshot.run_id} --out "
            f"{where} --state redis://lf-admin:PASSWORD@HOST:6379/0"
        ) from refused
    token = new_epoch()
    state.put_run_field(snapshot.run_id, RESTORED_FIELD, token)
    state.incr_counter(snapshot.run_id, "state_restored")
    log.warning(
        "recovery: run %s restored from its snapshot after round %d (epoch %s)",
        snapshot.run_id,
        snapshot.round_no,
        snapshot.epoch,
    )
    return token


def restore_at_start(state: StateStore, run_id: str, out_dir: Path | None) -> bool:
    """A service starting against a store without the run restores the run's latest snapshot, if its
    output directory has one; True if it did."""
    if EPOCH_FIELD in state.get_run_fields(run_id):
        return False
    snapshot = latest_snapshot(out_dir, run_id)
    if snapshot is None:
        return False
    restore(state, snapshot, out_dir)
    return True


def state_changed(state: StateStore, guard: EpochGuard) -> bool:
    """After a step failed: whether the run's state was lost, rolled back or restored (by another
    service) under it, which then, not the error it happened to cause (a record gone halfway through an
    aggregation, a round missing from a store restored meanwhile), is the cause. Accepts nothing: the
    service's own check of the epoch then takes the run back."""
    return guard.changed(state.get_run_fields(guard.run_id))


def wait_restored(
    state: StateStore, guard: EpochGuard, clock: Clock, *, wait_s: float = WAIT_S
) -> dict[str, Any] | None:
    """Wait up to ``wait_s`` for another service to restore the run this service saw (its epoch back,
    with a new restore token); the run's fields then (the guard has accepted them), else None."""
    deadline = clock.now() + wait_s
    while True:
        fields = state.get_run_fields(guard.run_id)
        if fields.get(EPOCH_FIELD) == guard.epoch and fields.get(RESTORED_FIELD) != guard.restored:
            guard.accept(fields)
            return fields
        if clock.now() >= deadline:
            return None
        clock.sleep(0.5)
