"""The aggregator: validates updates, closes rounds exactly once, merges, checkpoints, evaluates.

Every update is validated (envelope, sender, run, task, device, checksum, finiteness, shapes)
before it is recorded; what fails is dead-lettered with its reason and never touches the global
adapter. Recording, deduplication and quorum closing are one atomic state-store step. Closed
rounds wait in the state store's outbox until aggregated, so a restarted aggregator resumes.
Evaluation runs after ``RoundClosed`` is published: the next round does not wait for it; where the
devices evaluate too (``eval.device_fraction``), the global adapter goes out to them first
(aggregator/federated_eval.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from aggregator.federated_eval import FederatedEvaluation
from aggregator.merge.rankwise import WeightedUpdate
from aggregator.merge.registry import merge
from aggregator.receipts import fingerprint, fingerprint_of, receipt
from aggregator.validation import check_update_shapes
from lorafleet.ml.lora import Tensors, select_for_spec, shapes
from lorafleet.run import task_deadlines
from lorafleet.run.clock import Clock, SystemClock, to_ms
from lorafleet.run.epoch import RESTORED_FIELD, EpochGuard
from lorafleet.run.model_card import write_model_card
from lorafleet.run.recovery import WAIT_S as RESTORE_WAIT_S
from lorafleet.run.recovery import (
    latest_snapshot,
    restore,
    restore_at_start,
    state_changed,
    wait_restored,
    write_snapshot,
)
from lorafleet.run.report import build_report, write_report
from lorafleet.run.retention import expire_finished_run
from lorafleet.run.start_adapter import StartAdapterGone, start_adapter
from lorafleet.security.signing import verify
from lorafleet.state.base import StateStore
from lorafleet.transport import topology
from lorafleet.transport.base import Delivery, QueueNotFound, Subscription, Transport
from lorafleet.transport.messaging import Rejections, publish_message, receive
from lorafleet.transport.waiting import wait_for_topology
from schemas.config import RunConfig
from schemas.envelope import decode
from schemas.errors import MessageRefused, Rejected, StateLost, StateStoreError
from schemas.measurement import DeviceMeasurement
from schemas.messages import LoraSpec, LoraUpdate, ReplanRequest, RoundClosed, RoundEvaluated, TaskFailed
from schemas.tensors import decode_tensors, tensors_from_bytes, tensors_to_bytes

log = logging.getLogger(__name__)

#: a step of the loop that took this much longer than its wait is a stall (see _note_outages)
STALL_S = 5.0


class Evaluator(Protocol):
    def evaluate(self, spec: LoraSpec, tensors: Tensors) -> tuple[float, float]:
        """(accuracy, mean loss) of the adapter on the evaluation set."""
        ...


CheckpointWriter = Callable[[LoraSpec, Tensors, Path], None]


def update_norm(start: Tensors, trained: Tensors) -> float:
    """L2 norm of the change an update makes to the tensors it started from."""
    return math.sqrt(sum(float(((trained[k].double() - start[k].double()) ** 2).sum()) for k in start))


AGGREGATED_FIELD = "aggregated"  # run field: the latest round (global round) aggregated and snapshotted


def checkpoint_dir(out_dir: Path, round_no: int) -> Path:
    return out_dir / "checkpoints" / f"round-{round_no:04d}"


class AggregatorService:
    """``step`` handles at most one delivery, then any due closes, aggregations and evaluations."""

    def __init__(
        self,
        transport: Transport,
        state: StateStore,
        *,
        config: RunConfig,
        evaluator: Evaluator,
        write_checkpoint: CheckpointWriter | None = None,
        out_dir: Path | None = None,
        clock: Clock | None = None,
        drop_vanished: bool = True,
        fleet_key: bytes | None = None,
        snapshots: bool = True,
        restore_wait_s: float = RESTORE_WAIT_S,
    ) -> None:
        self.transport = transport
        self.restore_wait_s = restore_wait_s  # for another service to restore a lost run
        self.drop_vanished = drop_vanished  # off in embedded mode: in-process devices cannot vanish
        self.snapshots = snapshots  # off in embedded mode: the in-process store cannot lose the run
        self.fleet_key = fleet_key  # verifies device signatures (lorafleet/security/signing.py)
        if config.security.require_signatures and fleet_key is None:
            raise ValueError(
                "security.require_signatures is set but no fleet key was given (LORAFLEET_FLEET_KEY)"
            )
        self.state = state
        self.config = config
        self.run_id = config.run_id
        self.evaluator = evaluator
        self.write_checkpoint = write_checkpoint
        self.out_dir = out_dir
        self.clock = clock or SystemClock()
        self.federated = FederatedEvaluation(transport, state, config, clock=self.clock, fleet_key=fleet_key)
        self.finished = False
        self.rejections = Rejections(
            "aggregator", sink=lambda name: self.state.incr_counter(self.run_id, name)
        )
        self._subscription: Subscription | None = None
        self._to_evaluate: list[int] = []
        self._next_lease_check_ms = 0
        self._epoch = EpochGuard(self.run_id)  # the run's state must not vanish under us
        self._registered_samples: dict[str, int] = {}  # device -> num_samples it registered
        self._leases_resume_ms = 0  # no device is dropped before this (after a stall of this loop)
        self._last_step_at: float | None = None
        self._seen_connection: int | None = None  # the broker connection the last step saw
        self._expected: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
        self._short_deadlines: tuple[int, dict[str, int]] | None = None  # no-show devices' tasks
        self._snapshot_round: int | None = None  # the round of the latest snapshot this service wrote
        self._since_snapshot: set[tuple[int, str]] = set()  # (round, task) counted after that snapshot

    def start(self, *, wait_s: float = 600.0, poll_s: float = 1.0) -> None:
        """Subscribe to the updates queue, waiting up to ``wait_s`` for the orchestrator to declare it
        (where the broker did not load the definitions), and resume a lost evaluation. A store without
        the run, beside a snapshot of it in the output directory, gets the snapshot back first."""
        restore_at_start(self.state, self.run_id, self.out_dir)
        self._subscription = wait_for_topology(
            lambda: self.transport.subscribe(
                topology.UPDATES_QUEUE,
                prefetch=self.config.limits.aggregator_prefetch,  # bodies held: at most the buffer
                max_body_bytes=self.config.limits.max_message_bytes,
            ),
            missing=(QueueNotFound,),
            what=f"the orchestrator to declare {topology.UPDATES_QUEUE}",
            wait_s=wait_s,
            poll_s=poll_s,
            clock=self.clock,
        )
        self._resume_evaluation()

    def _resume_evaluation(self) -> None:
        """After a restart: evaluate the latest aggregate if its evaluation was lost."""
        stored = self.state.get_global_adapter(self.run_id)
        if stored is None or stored[0] == 0:
            return
        if "accuracy" not in self.state.get_round_metrics(self.run_id).get(stored[0], {}):
            self._to_evaluate.append(stored[0])

    # -- loop -----------------------------------------------------------------------------------
    def step(self, timeout: float = 0.0) -> bool:
        if self.finished:
            return False
        if self._subscription is None:
            self.start()
        try:
            return self._step(timeout)
        except Exception as exc:
            # the store lost, rolled back or got back the run under this step? That is the cause
            if not isinstance(exc, StateLost) and not state_changed(self.state, self._epoch):
                raise
            try:
                self._run_status()  # a restore by another service: the view is taken from it
            except StateLost as lost:
                self._recover(lost)
            return True

    def _step(self, timeout: float) -> bool:
        assert self._subscription is not None
        did = False
        self._note_outages(timeout)
        delivery = self._subscription.get(timeout)
        try:
            status = self._run_status()  # first: the run's state may have been lost
            if delivery is not None:
                self._handle(delivery)
                did = True
        except Exception:
            if delivery is not None:
                with contextlib.suppress(Exception):
                    delivery.requeue()  # not settled: handled again (once the run is back)
            raise
        if status == "finished":
            if not self.federated.settled():  # the final round's device evaluations may still come
                return did
            self._finalise()
            return True
        now_ms = to_ms(self.clock.now())
        self._drop_vanished_devices(now_ms)
        self._expire_no_show_tasks(now_ms)
        self.state.close_expired_rounds(self.run_id, now_ms)
        for round_no in self.state.pending_aggregations(self.run_id):
            self._aggregate(round_no)
            did = True
        did = self._after_aggregations() or did
        if self._to_evaluate:
            self._evaluate(self._to_evaluate.pop(0))
            did = True
        return did

    def _note_outages(self, timeout: float) -> None:
        """While this service is cut off from the broker (its consumer connection down, or its loop
        stalled: frozen, starved) the devices' heartbeats cannot be seen either: leases count again
        only a whole lease after it is back, so the time it spent away counts against no device."""
        if not self.drop_vanished:
            return  # embedded: in-process devices cannot vanish, and the loop also trains them
        assert self._subscription is not None
        now = self.clock.now()
        gap = 0.0 if self._last_step_at is None else now - self._last_step_at
        stalled = gap > timeout + STALL_S
        live = self._subscription.live_connection
        cut_off = live is None or (self._seen_connection is not None and live != self._seen_connection)
        if stalled or cut_off:
            resume_ms = to_ms(now + self.config.rounds.lease_s)
            if resume_ms > self._leases_resume_ms + 1000:
                log.warning(
                    "aggregator: %s; no device is dropped before %.0f s after it is back",
                    "the broker is away" if cut_off else f"this loop stalled for {gap:.1f} s",
                    self.config.rounds.lease_s,
                )
            self._leases_resume_ms = max(self._leases_resume_ms, resume_ms)
        self._last_step_at = now
        if live is not None:
            self._seen_connection = live

    def _drop_vanished_devices(self, now_ms: int) -> None:
        """Tasks of devices whose lease expired report empty, so their rounds go on without them.

        Not within a lease of an outage (see :meth:`_note_outages`), and not when every leased device
        expired at once: that is the heartbeat path (broker, orchestrator) failing, not the fleet."""
        if not self.drop_vanished or now_ms < max(self._next_lease_check_ms, self._leases_resume_ms):
            return
        self._next_lease_check_ms = now_ms + 500
        expired = set(self.state.expired_devices(self.run_id, now_ms))
        if not expired or expired >= set(self.state.get_devices(self.run_id)):
            return
        for round_no in self._open_rounds():
            info = self.state.get_round(self.run_id, round_no)
            if info is None or info.status != "open":
                continue
            for task_id, device_id in sorted(info.tasks.items()):
                if device_id in expired and self.state.get_update(self.run_id, round_no, task_id) is None:
                    result = self.state.record_update(self.run_id, round_no, task_id, device_id, b"", now_ms)
                    if result.outcome == "counted":
                        self.state.incr_counter(self.run_id, "task_dropped")
                        log.warning(
                            "aggregator: device %s vanished; round %d goes on without it", device_id, round_no
                        )

    def _expire_no_show_tasks(self, now_ms: int) -> None:
        """A no-show device's task whose short deadline passed without a report is counted empty, so
        that its round closes on quorum without it (orchestrator/no_shows.py)."""
        if self._short_deadlines is None:
            return
        round_no, deadlines = self._short_deadlines
        due = {t: ms for t, ms in deadlines.items() if ms <= now_ms}
        if not due:
            return
        info = self.state.get_round(self.run_id, round_no)
        if info is None or info.status != "open":
            return
        reported = self.state.get_updates(self.run_id, round_no)
        for task in sorted(due):
            if task in reported or task not in info.tasks:
                continue
            result = self.state.record_update(self.run_id, round_no, task, info.tasks[task], b"", now_ms)
            if result.outcome == "counted":
                self.state.incr_counter(self.run_id, "task_no_show")
                log.warning(
                    "aggregator: %s did not report its last task; round %d goes on without it",
                    info.tasks[task],
                    round_no,
                )

    def _after_aggregations(self) -> bool:
        """Work that follows round aggregations (a hierarchical run's global ones); True if any."""
        return False

    #: how many of the latest rounds may still be open (one at a time, and a restart's overlap)
    open_window = 3

    def _open_rounds(self) -> list[int]:
        rounds = self.state.list_rounds(self.run_id)
        return [
            r
            for r in rounds[-self.open_window :]
            if (info := self.state.get_round(self.run_id, r)) and info.status == "open"
        ]

    def run_forever(self, stop: object | None = None, *, poll_s: float = 0.5) -> None:
        is_set = getattr(stop, "is_set", lambda: False)
        while not self.finished and not is_set():
            self.step(poll_s)

    def _run_status(self) -> str | None:
        fields = self.state.get_run_fields(self.run_id)
        if self._epoch.check(fields):
            self._restored()  # from a snapshot, by another service
        self._short_deadlines = task_deadlines.current(fields)
        status = fields.get("status")
        if status == "running" and self._snapshot_round is None:
            self._snapshot(int(fields.get(AGGREGATED_FIELD, 0)))  # the first: before any aggregation
        return None if status is None else str(status)

    # -- state recovery (lorafleet/run/recovery.py) ---------------------------------------------
    def _snapshot(self, round_no: int) -> None:
        """Snapshot the run, only if the store held it (this epoch) from before this step's work until
        after the export: a store that lost the run halfway through would give a snapshot of debris."""
        if self.snapshots and self.out_dir is not None and self._epoch.epoch is not None:
            self._require_run()
            blob = self.state.export_run(self.run_id)
            self._require_run()
            write_snapshot(self.run_id, self._epoch.epoch, round_no, blob, self.out_dir)
        self._snapshot_round = round_no
        self._since_snapshot.clear()

    def _require_run(self) -> None:
        if state_changed(self.state, self._epoch):
            raise StateLost(f"the state of run {self.run_id!r} changed under a snapshot")

    def _checkpointed(self, round_no: int) -> None:
        """A round (a hierarchical run's global round) is aggregated, checkpointed and announced: fence
        it and snapshot the run, so that a store that loses what follows can be brought back to here."""
        try:
            self.state.put_run_field(self.run_id, AGGREGATED_FIELD, round_no)
            self._epoch.fence(AGGREGATED_FIELD, round_no)
        except StateStoreError as exc:  # a Redis ACL that keeps the run record read-only (no fence)
            log.warning("aggregator: cannot fence round %d in the run record: %s", round_no, exc)
        self._snapshot(round_no)

    def _recover(self, lost: StateLost) -> None:
        """The store lost the run (or rolled it back): import the latest snapshot of the run's epoch;
        without one, wait for another service to bring the run back, or stop (re-raise ``lost``)."""
        snapshot = latest_snapshot(self.out_dir, self.run_id, self._epoch.epoch)
        log.warning("aggregator: %s", lost)
        if snapshot is not None:
            restore(self.state, snapshot, self.out_dir)
            self._epoch.accept(self.state.get_run_fields(self.run_id))
        # the orchestrator waits restore_wait_s for a restore before it writes a registering run again
        elif wait_restored(self.state, self._epoch, self.clock, wait_s=2 * self.restore_wait_s) is None:
            raise StateLost(f"{lost}; no snapshot of it to restore (keep Redis persistent, or give --out)")
        self._restored()

    def _restored(self) -> None:
        """Take this service's view from the restored store: updates counted since the snapshot are
        accounted as lost with the state (their resends count in their place), caches are dropped, no
        device is dropped for a lease, and the latest aggregate is evaluated if it was not."""
        since = sorted(self._since_snapshot)
        lost = [(r, t) for r, t in since if t not in self.state.get_updates(self.run_id, r)]
        if lost:
            self.state.incr_counter(self.run_id, "update_lost_with_state", len(lost))
        self._since_snapshot.clear()
        self._snapshot_round = int(self.state.get_run_fields(self.run_id).get(AGGREGATED_FIELD, 0))
        self._expected.clear()
        self._registered_samples.clear()
        self._to_evaluate.clear()
        self._leases_resume_ms = to_ms(self.clock.now() + self.config.rounds.lease_s)
        self._resume_evaluation()
        log.warning("aggregator: going on from the restored state (%d counted updates lost)", len(lost))

    # -- ingress --------------------------------------------------------------------------------
    def _handle(self, delivery: Delivery) -> None:
        try:
            message = receive(delivery, run_id=self.run_id, max_bytes=self.config.limits.max_message_bytes)
            if self.federated.took(message):  # a device's evaluation result, checked and kept
                delivery.ack()
                return
            if isinstance(message, LoraUpdate | TaskFailed):
                self._check_signature(message)
            if isinstance(message, LoraUpdate):
                self._check_update(message)
                stored = delivery.body
            elif isinstance(message, TaskFailed):
                stored = b""  # the device reported: it counts toward the quorum, adds no tensors
            else:
                raise Rejected("unexpected_kind", f"the aggregator does not consume {type(message).__name__}")
            self._record(message, stored)
            delivery.ack()
        except MessageRefused as exc:
            if state_changed(self.state, self._epoch):  # no such round or task because the store
                raise StateLost(f"the state of run {self.run_id!r} changed under a report") from exc
            if self._round_lost_with_state(exc, delivery):
                return
            self.rejections.reject(delivery, exc)

    def _record(self, message: LoraUpdate | TaskFailed, stored: bytes) -> None:
        """Count a checked report in its round (once per task).

        Raises:
            Rejected: no such task, or another device's; a replay with other content.
        """
        result = self.state.record_update(
            self.run_id, message.round, message.task_id, message.device_id, stored, to_ms(self.clock.now())
        )
        if result.outcome in ("counted", "recovered"):
            self._since_snapshot.add((message.round, message.task_id))
        if result.outcome == "recovered":
            log.warning(
                "aggregator: %s from %s arrived after its device was dropped; round %d is open: counted",
                message.task_id,
                message.device_id,
                message.round,
            )
        if result.outcome in ("unknown_task", "wrong_device"):
            raise Rejected(result.outcome, f"{message.task_id} from {message.device_id}")
        if result.outcome == "duplicate" and isinstance(message, LoraUpdate):
            self._check_not_replayed(message)
        if isinstance(message, TaskFailed):
            self.state.incr_counter(self.run_id, "task_failed")

    def _round_lost_with_state(self, exc: MessageRefused, delivery: Delivery) -> bool:
        """An update for a round the restored state does not have (opened after its snapshot, not yet
        opened again): accounted ``lost_with_state``, not refused; its resend counts once the
        orchestrator opens the round again. True if that is what ``exc`` was."""
        if not isinstance(exc, Rejected) or exc.reason != "unknown_task":
            return False
        fields = self.state.get_run_fields(self.run_id)
        try:
            message = decode(delivery.body)
        except MessageRefused:
            return False
        round_no = getattr(message, "round", None)
        if RESTORED_FIELD not in fields or not isinstance(round_no, int):
            return False
        if round_no <= int(str(fields.get("round", 0))) or self.state.get_round(self.run_id, round_no):
            return False
        self.state.incr_counter(self.run_id, "update_lost_with_state")
        delivery.ack()
        return True

    def _check_signature(self, report: LoraUpdate | TaskFailed) -> None:
        if not self.config.security.require_signatures:
            return
        if self.fleet_key is None or not verify(self.fleet_key, report):
            what = "no signature" if report.signature is None else "a signature that does not verify"
            raise Rejected("bad_signature", f"{report.task_id} claims {report.device_id} with {what}")

    def _check_not_replayed(self, update: LoraUpdate) -> None:
        """A counted task arriving again is a harmless redelivery only if it is the same update: the same
        tensors, sample count and plan. Not the same bytes: every send of one update has its own
        envelope time, and a task retrained after a worker crash has its own measured metrics."""
        counted = self.state.get_update(self.run_id, update.round, update.task_id)
        if not counted:
            return  # reported empty (a vanished device, or TaskFailed): nothing to compare
        if fingerprint(counted) != fingerprint_of(update):
            raise Rejected("replayed", f"{update.task_id} was counted with other content")

    def _check_update(self, update: LoraUpdate) -> None:
        expected = self._expected_shapes(update.round, update.task_id)
        tensors = decode_tensors(update.adapter, max_bytes=self.config.limits.max_payload_bytes)
        check_update_shapes(tensors, expected)
        self._check_samples(update)
        bound = self.config.limits.max_update_norm
        if bound is not None:
            spec_json = self.state.get_task_spec(self.run_id, update.round, update.task_id)
            assert spec_json is not None  # the shapes check found it
            spec = LoraSpec.model_validate_json(spec_json)
            try:
                start = select_for_spec(start_adapter(self.state, self.run_id, update.round), spec)
            except StartAdapterGone:
                return  # its round was merged already: the update will be accounted as late
            norm = update_norm(start, tensors)
            if norm > bound:
                raise Rejected("norm_exceeded", f"update changes the adapter by {norm:.3g} > {bound:.3g}")

    def _check_samples(self, update: LoraUpdate) -> None:
        """An update weighs as many samples as it claims: never more than its device registered."""
        registered = self._registered_samples.get(update.device_id)
        if registered is None or update.num_samples > registered:  # unknown here, or re-registered
            info = self.state.get_device(self.run_id, update.device_id) or {}
            registered = int(info.get("num_samples", 0))
            self._registered_samples[update.device_id] = registered
        if update.num_samples > registered:
            claim = f"{update.task_id} claims {update.num_samples} samples"
            raise Rejected("samples_exceeded", f"{claim}, {update.device_id} registered {registered}")

    def _expected_shapes(self, round_no: int, task_id: str) -> dict[str, tuple[int, ...]]:
        cached = self._expected.get((round_no, task_id))
        if cached is not None:
            return cached
        spec_json = self.state.get_task_spec(self.run_id, round_no, task_id)
        if spec_json is None:
            raise Rejected("unknown_task", f"no task {task_id} in round {round_no}")
        spec = LoraSpec.model_validate_json(spec_json)
        expected = shapes(select_for_spec(self._global()[1], spec))
        if len(self._expected) > 4096:
            self._expected.clear()
        self._expected[(round_no, task_id)] = expected
        return expected

    def _global(self) -> tuple[int, Tensors]:
        stored = self.state.get_global_adapter(self.run_id)
        if stored is None:
            raise RuntimeError(f"run {self.run_id}: no global adapter in the state store")
        return stored[0], tensors_from_bytes(stored[1])

    def _global_spec(self) -> LoraSpec:
        return LoraSpec.model_validate_json(self.state.get_run_fields(self.run_id)["global_spec"])

    # -- aggregation ----------------------------------------------------------------------------
    def _aggregate(self, round_no: int) -> None:
        started = time.perf_counter()
        version, current = self._global()
        stored, messages = self._round_updates(round_no)
        if version >= round_no:
            merged = current  # aggregated before a crash; the stored result stands
        else:
            merged = merge(self.config, current, self._weighted(round_no, messages))
            self.state.put_global_adapter(self.run_id, round_no, tensors_to_bytes(merged))
        if self.out_dir is not None and self.write_checkpoint is not None:
            self.write_checkpoint(self._global_spec(), merged, checkpoint_dir(self.out_dir, round_no))
        closed = self._record_round_metrics(round_no, stored, messages, started)
        self.state.mark_aggregated(self.run_id, round_no, round_no)  # before it is announced: the
        self._publish(closed.model_copy(update={"global_version": round_no}))  # store is the truth
        self._compact(round_no, stored, messages)
        self._to_evaluate.append(round_no)
        self._checkpointed(round_no)
        log.info(
            "aggregator: round %d closed (%s) with %d/%d updates",
            round_no,
            closed.reason,
            closed.devices_reported,
            closed.tasks_issued,
        )

    def _compact(self, round_no: int, stored: dict[str, int], messages: list[LoraUpdate]) -> None:
        """An aggregated round keeps receipts, not tensors: the merge is in the global (or group)
        adapter and its checkpoint, so the state store does not grow with every round's updates."""
        by_task = {m.task_id: m for m in messages}
        receipts = {t: receipt(by_task[t], size) for t, size in stored.items() if size and t in by_task}
        self.state.compact_updates(self.run_id, round_no, receipts)

    def _round_updates(self, round_no: int) -> tuple[dict[str, int], list[LoraUpdate]]:
        """A closed round's reports (task id -> bytes stored; 0 for dropped or failed tasks) and the
        updates among them without their tensors, read one at a time (see :meth:`_weighted`)."""
        info = self.state.get_round(self.run_id, round_no)
        stored: dict[str, int] = {}
        messages: list[LoraUpdate] = []
        for task_id in sorted(info.tasks) if info is not None else []:
            body = self.state.get_update(self.run_id, round_no, task_id)
            if body is None:
                continue  # never reported
            stored[task_id] = len(body)
            if body:
                message = self._stored_update(body)
                payload = message.adapter.model_copy(update={"data": b""})  # sha256 and size stay
                messages.append(message.model_copy(update={"adapter": payload}))
        return stored, messages

    def _weighted(self, round_no: int, messages: list[LoraUpdate]) -> Iterator[WeightedUpdate]:
        """The updates' tensors, each read from the state store when the merge asks for it, so the
        merge holds one update at a time (aggregator.merge.registry.merge)."""
        for m in messages:
            yield WeightedUpdate(self._stored_tensors(round_no, m.task_id), float(m.num_samples))

    def _stored_tensors(self, round_no: int, task_id: str) -> Tensors:
        """A counted update's tensors (its stored bytes and payload are dropped on return)."""
        body = self.state.get_update(self.run_id, round_no, task_id)
        assert body, f"{task_id}: its stored update vanished before the merge"
        update = self._stored_update(body)
        del body  # before the tensors are loaded: the payload and the tensors are enough at once
        return decode_tensors(update.adapter, check_finite=False)

    def _record_round_metrics(
        self,
        round_no: int,
        stored: dict[str, int],
        messages: list[LoraUpdate],
        started: float,
        extra: dict[str, object] | None = None,
    ) -> RoundClosed:
        """Store a closed round's metrics (what its devices reported and measured); the RoundClosed
        that announces it (``global_version`` 0: the caller sets it)."""
        info = self.state.get_round(self.run_id, round_no)
        assert info is not None
        bytes_up = sum(stored.values())
        reason = info.close_reason or "deadline"
        self.state.put_round_metrics(
            self.run_id,
            round_no,
            {
                **(extra or {}),
                "devices_reported": len(messages),
                "virtual_round_s": max((m.metrics.device_time_s for m in messages), default=0.0),
                "devices": {m.device_id: DeviceMeasurement.of(m).model_dump(mode="json") for m in messages},
                "reports": len(stored),
                "tasks_issued": len(info.tasks),
                "bytes_up": bytes_up,
                "close_reason": reason,
                "closed_at": (info.closed_ms or 0) / 1000.0,
                "aggregation_s": time.perf_counter() - started,
            },
        )
        return RoundClosed(
            run_id=self.run_id,
            round=round_no,
            reason=reason,
            tasks_issued=len(info.tasks),
            devices_reported=len(messages),
            bytes_up=bytes_up,
            global_version=0,
        )

    def _publish(self, message: RoundClosed | RoundEvaluated | ReplanRequest) -> None:
        """Tell the orchestrator (the rounds exchange)."""
        publish_message(self.transport, topology.ROUNDS_EXCHANGE, topology.ROUNDS_KEY, message)

    @staticmethod
    def _stored_update(body: bytes) -> LoraUpdate:
        message = decode(body)  # stored only after validation
        assert isinstance(message, LoraUpdate)
        return message

    def _evaluate(self, round_no: int) -> None:
        version, tensors = self._global()
        if version != round_no:
            return  # a newer aggregate exists already; only the latest is evaluated
        self.federated.publish_task(round_no, self._global_spec(), tensors)  # the devices evaluate it too
        started = time.perf_counter()
        accuracy, loss = self.evaluator.evaluate(self._global_spec(), tensors)
        eval_s = time.perf_counter() - started
        self.state.put_round_metrics(
            self.run_id, round_no, {"accuracy": accuracy, "loss": loss, "eval_s": eval_s}
        )
        self._publish(
            RoundEvaluated(run_id=self.run_id, round=round_no, accuracy=accuracy, loss=loss, eval_s=eval_s)
        )
        log.info("aggregator: round %d accuracy %.4f loss %.4f", round_no, accuracy, loss)

    # -- end of run -----------------------------------------------------------------------------
    def _finalise(self) -> None:
        """Publish the final adapter (the final round's checkpoint) as ``out_dir/adapter``."""
        fields = self.state.get_run_fields(self.run_id)
        final_round = int(fields.get("final_round", 0))
        if self.out_dir is not None and self.write_checkpoint is not None and final_round > 0:
            source = checkpoint_dir(self.out_dir, final_round)
            target = self.out_dir / "adapter"
            if source.is_dir():
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(source, target)
        if self.out_dir is not None:
            # the orchestrator wrote the report when it finished; updates handled since then count too
            report = build_report(self.config, self.state)
            write_report(report, self.out_dir)
            if (self.out_dir / "adapter").is_dir():
                write_model_card(self.out_dir / "adapter", report)
        expire_finished_run(self.state, self.run_id, self.config.state.retention_s, "aggregator")
        self.finished = True
        log.info("aggregator: run finished; final adapter is round %d", final_round)
