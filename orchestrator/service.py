"""The orchestrator owns the plan: registers devices, opens rounds, publishes tasks, stops the run.

Round state lives in the state store, so a restarted orchestrator resumes where it was: an open
round's tasks are published again (duplicates are harmless: tasks and updates are idempotent by
task id), a round that closed while it was down is picked up from the store.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from lorafleet.devices.costmodel import CostModel, cost_model_for
from lorafleet.ml.lora import Tensors, select_for_spec
from lorafleet.run import task_deadlines
from lorafleet.run.clock import Clock, SystemClock, to_ms
from lorafleet.run.epoch import EPOCH_FIELD, RESTORED_FIELD, EpochGuard, new_epoch
from lorafleet.run.progress import RunReporter
from lorafleet.run.recovery import WAIT_S as RESTORE_WAIT_S
from lorafleet.run.recovery import restore_at_start, state_changed, wait_restored
from lorafleet.run.report import build_report, write_report
from lorafleet.run.retention import expire_finished_run
from lorafleet.run.start_adapter import start_adapter
from lorafleet.run.stopping import stop_requested
from lorafleet.state.base import StateStore
from lorafleet.transport import topology
from lorafleet.transport.base import AccessRefused, Delivery, QueueNotFound, Subscription, Transport
from lorafleet.transport.messaging import Rejections, publish_message, receive
from orchestrator.capacity import DeviceEstimate, calibrated, update_estimate
from orchestrator.no_shows import next_no_shows, task_deadlines_ms
from orchestrator.planners.context import PlanningContext, size_model
from orchestrator.planners.legend import DeviceInput
from orchestrator.planners.registry import round_planner
from orchestrator.planners.specs import DevicePlan, global_spec
from orchestrator.rounds import quorum_size, sample_devices, task_id
from schemas.config import RunConfig
from schemas.envelope import encode
from schemas.errors import MessageRefused, Rejected, StateLost, StateRolledBack
from schemas.measurement import DeviceMeasurement
from schemas.messages import (
    DeviceRegistered,
    DeviceSlot,
    Heartbeat,
    LoraSpec,
    RegisterAgain,
    ReplanRequest,
    RoundClosed,
    RoundEvaluated,
    RunFinished,
    TrainHyperParams,
    TrainTask,
)
from schemas.tensors import encode_tensors, tensors_from_bytes, tensors_to_bytes

log = logging.getLogger(__name__)

Phase = Literal["registering", "running", "finishing", "finished"]
FinishReason = Literal["max_rounds", "target_accuracy", "time_budget", "virtual_budget", "aborted", "stopped"]


class OrchestratorService:
    """``step`` handles at most one delivery, then checks registration and budgets."""

    def __init__(
        self,
        transport: Transport,
        state: StateStore,
        *,
        config: RunConfig,
        num_blocks: int,
        initial_adapter: Callable[[LoraSpec], Tensors],
        out_dir: Path | None = None,
        clock: Clock | None = None,
        reporter: RunReporter | None = None,
        cost: CostModel | None = None,
        plan_live_only: bool = False,
        restore_wait_s: float = RESTORE_WAIT_S,
    ) -> None:
        self.transport = transport
        self.restore_wait_s = restore_wait_s  # for another service to restore a lost run
        self.state = state
        self.config = config
        self.run_id = config.run_id
        self.num_blocks = num_blocks
        self.initial_adapter = initial_adapter
        self.out_dir = out_dir
        self.clock = clock or SystemClock()
        self.reporter = reporter or RunReporter(config, quiet=True)
        self.cost = cost or cost_model_for(config.model.name, num_blocks, config.model.tiny_hidden)
        # plan only devices whose liveness lease holds (distributed hierarchical runs; in-process
        # devices send no heartbeats)
        self.plan_live_only = plan_live_only
        self.estimates: dict[str, DeviceEstimate] = {}
        self._no_shows: set[str] = set()  # devices that held a task without reporting (no_shows.py)
        self.global_spec = global_spec(config, num_blocks)
        self.phase: Phase = "registering"
        self.round = 0
        self.report: dict[str, object] | None = None
        self._slots = frozenset(config.device_ids())
        self._epoch = EpochGuard(self.run_id)  # the run's state must not vanish under us
        self._next_epoch_check = 0.0
        self._next_round_poll = 0.0
        self.rejections = Rejections(
            "orchestrator", sink=lambda name: self.state.incr_counter(self.run_id, name)
        )
        self._subscription: Subscription | None = None
        self._started_at = self.clock.now()
        self._registration_started = self.clock.now()
        self._finishing: tuple[FinishReason, int] | None = None

    @property
    def finished(self) -> bool:
        return self.phase == "finished"

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Declare topology (where allowed), subscribe, and resume or initialise the run."""
        try:
            topology.declare_static_topology(self.transport)
        except AccessRefused:
            log.info("orchestrator: topology comes from the broker's definitions")
        self._subscription = self.transport.subscribe(topology.ORCHESTRATOR_QUEUE, prefetch=16)
        restore_at_start(self.state, self.run_id, self.out_dir)
        fields = self.state.get_run_fields(self.run_id)
        status = fields.get("status")
        if status == "finished":
            self.phase = "finished"
        elif status == "running":
            self._resume(fields)
        else:
            self._initialise()
        self._epoch.check(self.state.get_run_fields(self.run_id))

    def _initialise(self, epoch: str | None = None) -> None:
        """Write the run's record (a new epoch, or ``epoch`` again when the store lost a run that was
        registering) and publish the device slots once."""
        if EPOCH_FIELD not in self.state.get_run_fields(self.run_id):
            self.state.put_run_field(self.run_id, EPOCH_FIELD, epoch or new_epoch())
        self.state.put_run_field(self.run_id, "config", self.config.model_dump(mode="json"))
        self.state.put_run_field(self.run_id, "global_spec", self.global_spec.model_dump_json())
        if self.state.get_global_adapter(self.run_id) is None:
            self.state.put_global_adapter(
                self.run_id, 0, tensors_to_bytes(self.initial_adapter(self.global_spec))
            )
        self.state.put_run_field(self.run_id, "status", "registering")
        if epoch is not None:  # written again after a loss: the tokens are out already
            self.state.put_run_field(self.run_id, "slots_published", True)
            self.state.put_run_field(self.run_id, RESTORED_FIELD, new_epoch())
        for device_id in self.state.get_devices(self.run_id):
            self._declare_device_queue(device_id)
        self._publish_slots()

    def _publish_slots(self) -> None:
        """One token per device slot, for workers started without a device id (once per run)."""
        if self.state.get_run_fields(self.run_id).get("slots_published"):
            return
        for device_id in self.config.device_ids():
            publish_message(
                self.transport,
                topology.SLOTS_EXCHANGE,
                topology.SLOT_KEY,
                DeviceSlot(run_id=self.run_id, device_id=device_id),
            )
        self.state.put_run_field(self.run_id, "slots_published", True)

    def _resume(self, fields: dict[str, object]) -> None:
        self.phase = "running"
        self._finishing = None
        self.round = int(str(fields.get("round", 0)))
        self._epoch.fence("round", self.round)
        self._started_at = float(str(fields.get("started_at", self.clock.now())))
        raw = fields.get("estimates") or {}
        assert isinstance(raw, dict)
        self.estimates = {d: DeviceEstimate(**e) for d, e in raw.items()}
        self._no_shows = set(fields.get("no_shows") or [])  # type: ignore[call-overload]
        for device_id in self.state.get_devices(self.run_id):
            self._declare_device_queue(device_id)
        log.info("orchestrator: resuming run %s at round %d", self.run_id, self.round)
        self._resume_round()

    def _resume_round(self) -> None:
        """Go on with the current round after a restart."""
        info = self.state.get_round(self.run_id, self.round)
        if info is None and self.round > 0:
            self._open_round(self.round)  # its opening was lost with the state (or cut short)
        elif info is not None and info.status == "open":
            self._publish_tasks(self.round)  # tasks may not all have gone out before the crash
        elif info is not None and info.status == "aggregated":
            # its RoundClosed may have died with the previous incarnation (or will be ignored now)
            self._account_round(self.round)
            self._after_round(self.round)

    # -- loop -----------------------------------------------------------------------------------
    def step(self, timeout: float = 0.0) -> bool:
        if self.finished:
            return False
        if self._subscription is None:
            self.start()
        assert self._subscription is not None
        delivery = self._subscription.get(timeout)
        try:
            if delivery is not None:
                intact = self._state_intact()  # checked before the state is touched
                if not intact:
                    delivery.requeue()  # handled against the restored state
                    return True
                try:
                    self._handle(delivery)
                except Exception:
                    with contextlib.suppress(Exception):
                        delivery.requeue()  # not settled: handled again
                    raise
            self._tick()
        except Exception:
            if not state_changed(self.state, self._epoch):
                raise
            self._state_intact()  # the store lost (or got back) the run under this step: the cause
        return delivery is not None

    def run_forever(self, stop: object | None = None, *, poll_s: float = 0.5) -> None:
        is_set = getattr(stop, "is_set", lambda: False)
        while not self.finished and not is_set():
            self.step(poll_s)

    def _tick(self) -> None:
        now = self.clock.now()
        if now >= self._next_epoch_check:
            self._next_epoch_check = now + 1.0
            if not self._state_intact():
                return
        if self.phase == "registering":
            devices = self.state.count_devices(self.run_id)
            waited = now - self._registration_started
            if devices >= self.config.min_devices or (
                devices and waited > self.config.rounds.registration_timeout_s
            ):
                self._begin()
            elif waited > self.config.rounds.registration_timeout_s:
                self._finish("aborted", 0)
        elif self.phase == "running" and self._over_time_budget() and self._round_aggregated(self.round):
            self._finish("time_budget", self.round)
        elif self.phase == "running" and now >= self._next_round_poll:
            self._next_round_poll = now + 1.0
            self._poll_round_closed()

    def _state_intact(self) -> bool:
        """Whether the store still holds the run as this service last saw it; if not, take the run back
        from it (lorafleet/run/recovery.py) and return False.

        Lost (the epoch gone): wait for the aggregator to restore its latest snapshot, then resume from
        it; a run still registering, which has no snapshot, is written again with the same epoch (its
        devices register again when their heartbeats are answered with ``RegisterAgain``); otherwise
        stop with :class:`StateLost`. Restored by another service, or rolled back (this service's round
        behind what it wrote: a failover lost it): resume from what the store holds."""
        fields = self.state.get_run_fields(self.run_id)
        try:
            if not self._epoch.check(fields):
                return True
        except StateRolledBack as behind:
            log.warning("orchestrator: %s; resuming from the state store", behind)
            self._epoch.accept(fields)
        except StateLost as lost:
            log.warning("orchestrator: %s; waiting for the aggregator to restore it", lost)
            restored = wait_restored(self.state, self._epoch, self.clock, wait_s=self.restore_wait_s)
            if restored is None and self.phase == "registering":
                epoch = self._epoch.epoch
                self._initialise(epoch)
                self._epoch.accept(self.state.get_run_fields(self.run_id))
                self._registration_started = self.clock.now()
                log.warning("orchestrator: the run was registering; written again, devices register again")
                return False
            if restored is None:
                raise StateLost(f"{lost}; nobody restored it (the aggregator keeps the snapshots)") from lost
            fields = restored
        if fields.get("status") == "finished":
            self.phase = "finished"
        elif fields.get("status") == "running":
            self._resume(fields)
        return False

    def _round_aggregated(self, round_no: int) -> bool:
        """The round is over (aggregated), or there is none."""
        info = self.state.get_round(self.run_id, round_no)
        return info is None or info.status == "aggregated"

    def _over_time_budget(self) -> bool:
        budget = self.config.rounds.time_budget_s
        return budget is not None and self.clock.now() - self._started_at >= budget

    # -- ingress --------------------------------------------------------------------------------
    def _handle(self, delivery: Delivery) -> None:
        try:
            message = receive(delivery, run_id=self.run_id, max_bytes=self.config.limits.max_message_bytes)
            if isinstance(message, DeviceRegistered | Heartbeat):
                self._check_device(message.device_id)
            if isinstance(message, DeviceRegistered):
                self._on_registered(message)
            elif isinstance(message, Heartbeat):
                self._on_heartbeat(message)
            elif isinstance(message, RoundClosed):
                self._on_round_closed(message)
            elif isinstance(message, RoundEvaluated):
                self._on_round_evaluated(message)
            elif isinstance(message, ReplanRequest):
                self._on_replan(message)
            else:
                raise Rejected(
                    "unexpected_kind", f"the orchestrator does not consume {type(message).__name__}"
                )
            delivery.ack()
        except MessageRefused as exc:
            self.rejections.reject(delivery, exc)

    def _check_device(self, device_id: str) -> None:
        """Only the run's device slots may register or heartbeat: a made-up device would be given tasks
        and hold rounds open until their deadline."""
        if device_id not in self._slots:
            raise Rejected("unknown_device", f"{device_id} is not one of the run's {len(self._slots)} slots")

    def _on_heartbeat(self, message: Heartbeat) -> None:
        """Extend the device's lease; a device the run does not have registered (its registration was
        lost with the state) is asked to register again."""
        if self.state.get_device(self.run_id, message.device_id) is None:
            publish_message(
                self.transport,
                topology.TASKS_EXCHANGE,
                message.device_id,
                RegisterAgain(run_id=self.run_id, device_id=message.device_id, seq=message.seq),
            )
            self.state.incr_counter(self.run_id, "register_again")
            return
        self.state.touch_device(
            self.run_id, message.device_id, to_ms(self.clock.now() + self.config.rounds.lease_s)
        )

    def _on_replan(self, message: ReplanRequest) -> None:
        """Flat strategies replan every round anyway."""
        log.info("orchestrator: replan requested after round %d: %s", message.round, message.reason)

    def _on_registered(self, message: DeviceRegistered) -> None:
        info = message.model_dump(mode="json", exclude={"run_id", "device_id"})
        new = self.state.register_device(self.run_id, message.device_id, info)
        self._declare_device_queue(message.device_id)
        self.state.touch_device(
            self.run_id, message.device_id, to_ms(self.clock.now() + self.config.rounds.lease_s)
        )
        if new:
            self.reporter.device_registered(message.device_id, self.state.count_devices(self.run_id))
        self._calibrated(message)

    def _calibrated(self, message: DeviceRegistered) -> None:
        """A measuring device's first capacity estimate, from the calibration it registered with
        (devices.emulate false; an emulated run ignores real seconds, and rounds' estimates win)."""
        if self.config.device_times != "measured" or not message.calibration:
            return
        estimate = calibrated(message.calibration, self.cost, self.estimates.get(message.device_id))
        if estimate is not None and message.device_id not in self.estimates:
            self.estimates[message.device_id] = estimate
            stored = {d: vars(e) for d, e in self.estimates.items()}
            self.state.put_run_field(self.run_id, "estimates", stored)

    def _declare_device_queue(self, device_id: str) -> None:
        self.transport.declare_queue(topology.device_task_queue(device_id))
        if self.config.eval.federated:  # where the aggregator's evaluation tasks reach it
            self.transport.declare_queue(topology.device_eval_queue(device_id))

    def _on_round_closed(self, message: RoundClosed) -> None:
        if message.round != self.round or self.phase not in ("running", "finishing"):
            return  # a duplicate, or a round we already moved past
        if not self._round_aggregated(message.round):
            return  # announced by a state the store lost since: the aggregator will announce it again
        if self._account_round(message.round):
            self._after_round(message.round)

    def _poll_round_closed(self) -> None:
        """Go on when the store shows the current round aggregated though no RoundClosed came (it died
        with an aggregator between the two, or was announced from a state the store lost)."""
        info = self.state.get_round(self.run_id, self.round)
        if info is not None and info.status == "aggregated" and self._account_round(self.round):
            self._after_round(self.round)

    def _account_round(self, round_no: int) -> bool:
        """Record an aggregated round's times and fold its measurements into the estimates, once;
        False if that was done before (a redelivered RoundClosed)."""
        metrics = self.state.get_round_metrics(self.run_id).get(round_no, {})
        if "wall_time_s" in metrics:
            return False
        now = self.clock.now()
        opened_at = float(metrics.get("opened_at", now))
        previous = self.state.get_round_metrics(self.run_id).get(round_no - 1, {})
        virtual = float(previous.get("virtual_time_s", 0.0)) + float(metrics.get("virtual_round_s", 0.0))
        self._update_estimates(metrics.get("devices", {}))
        self._note_no_shows(round_no)
        self.state.put_round_metrics(
            self.run_id,
            round_no,
            {
                "wall_time_s": now - self._started_at,
                "round_time_s": now - opened_at,
                "virtual_time_s": virtual,
            },
        )
        self.reporter.round_closed(round_no, self.state.get_round_metrics(self.run_id)[round_no])
        return True

    def _note_no_shows(self, round_no: int) -> None:
        info = self.state.get_round(self.run_id, round_no)
        if info is None:
            return
        # who reported tensors, from the round's metrics (this service may not read update blobs)
        reported = set(self.state.get_round_metrics(self.run_id).get(round_no, {}).get("devices", {}))
        updates = {t: b"u" for t, d in info.tasks.items() if d in reported}
        self._no_shows = next_no_shows(self._no_shows, info.tasks, updates, info.close_reason)
        self.state.put_run_field(self.run_id, "no_shows", sorted(self._no_shows))

    def _update_estimates(self, measurements: dict[str, object]) -> None:
        """Fold the round's per-device measurements into the smoothed capacity estimates."""
        for device_id, m in sorted(measurements.items()):
            estimate = update_estimate(
                self.estimates.get(device_id),
                DeviceMeasurement.from_stored(m),
                self.cost,
                rho=self.config.legend.ema,
            )
            if estimate is not None:
                self.estimates[device_id] = estimate
        self.state.put_run_field(self.run_id, "estimates", {d: vars(e) for d, e in self.estimates.items()})

    def _after_round(self, round_no: int) -> None:
        if self.phase == "finishing":
            return
        if round_no >= self.config.rounds.max_rounds:
            self._finish_after_evaluation("max_rounds", round_no)
        elif self._over_time_budget():
            self._finish_after_evaluation("time_budget", round_no)
        elif self._over_virtual_budget(round_no):
            self._finish_after_evaluation("virtual_budget", round_no)
        elif stop_requested(self.state.get_run_fields(self.run_id)):  # lorafleet stop
            self._finish_after_evaluation("stopped", round_no)
        else:
            self._open_round(round_no + 1)

    def _over_virtual_budget(self, round_no: int) -> bool:
        budget = self.config.rounds.virtual_budget_s
        spent = self.state.get_round_metrics(self.run_id).get(round_no, {}).get("virtual_time_s", 0.0)
        return budget is not None and float(spent) >= budget

    def _on_round_evaluated(self, message: RoundEvaluated) -> None:
        self.reporter.round_evaluated(message.round, message.accuracy, message.loss)
        if self.config.rounds.target_reached(message.accuracy, message.loss) and self.phase == "running":
            self._finish("target_accuracy", message.round)
        elif self._finishing is not None and message.round == self._finishing[1]:
            self._finish(*self._finishing)

    def _finish_after_evaluation(self, reason: FinishReason, round_no: int) -> None:
        self.phase = "finishing"
        self._finishing = (reason, round_no)
        if "accuracy" in self.state.get_round_metrics(self.run_id).get(round_no, {}):
            self._finish(reason, round_no)

    # -- rounds ---------------------------------------------------------------------------------
    def _begin(self) -> None:
        self.phase = "running"
        self._started_at = self.clock.now()
        self.state.put_run_field(self.run_id, "started_at", self._started_at)
        self.state.put_run_field(self.run_id, "status", "running")
        self._open_round(1)

    def _planning_context(self, round_no: int) -> PlanningContext:
        """This round's sample of the registered devices, with their estimates."""
        registered = self.state.get_devices(self.run_id)
        devices = sample_devices(
            list(registered), self.config.rounds.sample_fraction, round_no, self.config.seed
        )
        stored = self.state.get_global_adapter(self.run_id)
        assert stored is not None
        return PlanningContext(
            round_no=round_no,
            devices=[
                DeviceInput(d, int(registered[d].get("num_samples", 1)), self.estimates.get(d))
                for d in devices
            ],
            num_blocks=self.num_blocks,
            config=self.config,
            cost=self.cost,
            sizes=size_model(tensors_from_bytes(stored[1])),
        )

    def _open_round(self, round_no: int) -> None:
        round_plan = round_planner(self.config.strategy)(self._planning_context(round_no))
        now = self.clock.now()
        self._open_state_round(round_no, round_plan.plans, now)
        self.state.put_run_field(self.run_id, "round", round_no)
        self._epoch.fence("round", round_no)
        self.round = round_no
        self.state.put_round_metrics(
            self.run_id,
            round_no,
            {
                "opened_at": now,
                "tasks_issued": len(round_plan.plans),
                "planned_round_s": round_plan.deadline_s,
                "depths": {p.device_id: len(p.lora.layer_ranks) for p in round_plan.plans},
            },
        )
        self._publish_tasks(round_no)

    def _open_state_round(self, round_no: int, plans: list[DevicePlan], now: float) -> None:
        """Record a round's tasks, their specs, quorum and deadline in the state store (idempotent)."""
        tasks = {task_id(self.run_id, round_no, p.device_id): p.device_id for p in plans}
        specs = {task_id(self.run_id, round_no, p.device_id): p.lora.model_dump_json() for p in plans}
        deadline = now + self.config.rounds.round_deadline_s
        quorum = quorum_size(len(tasks), self.config.rounds.quorum_fraction)
        short = min(self.config.rounds.no_show_deadline_s, self.config.rounds.round_deadline_s)
        deadlines = task_deadlines_ms(tasks, self._no_shows, to_ms(now), short)
        # read by the aggregator (it counts such a task empty once its deadline passes) and the tasks
        record = task_deadlines.record(round_no, deadlines)
        self.state.put_run_field(self.run_id, task_deadlines.FIELD, record)
        self.state.open_round(self.run_id, round_no, tasks, specs, quorum, to_ms(deadline), to_ms(now))

    def _publish_tasks(self, round_no: int) -> None:
        info = self.state.get_round(self.run_id, round_no)
        assert info is not None
        global_tensors = start_adapter(self.state, self.run_id, round_no)
        short = task_deadlines.of_round(self.state.get_run_fields(self.run_id), round_no)
        payloads: dict[str, object] = {}
        bytes_down = 0
        for tid, device_id in sorted(info.tasks.items()):
            spec_json = self.state.get_task_spec(self.run_id, round_no, tid)
            assert spec_json is not None
            spec = LoraSpec.model_validate_json(spec_json)
            if spec_json not in payloads:
                payloads[spec_json] = encode_tensors(select_for_spec(global_tensors, spec))
            task = TrainTask(
                task_id=tid,
                run_id=self.run_id,
                round=round_no,
                device_id=device_id,
                plan_version=round_no,
                lora=spec,
                hparams=self._hparams(),
                adapter=payloads[spec_json],  # type: ignore[arg-type]
                issued_at=info.opened_ms / 1000.0,
                deadline_at=short.get(tid, info.deadline_ms) / 1000.0,
            )
            body = encode(task)
            self._purge_stale_tasks(device_id)
            self.transport.publish(topology.TASKS_EXCHANGE, device_id, body, message_id=task.message_id)
            bytes_down += len(body)
        self.state.put_round_metrics(self.run_id, round_no, {"bytes_down": bytes_down})
        self._report_opened(round_no, len(info.tasks))

    def _report_opened(self, round_no: int, tasks: int) -> None:
        self.reporter.round_opened(round_no, tasks)

    def _purge_stale_tasks(self, device_id: str) -> None:
        """Drop tasks still waiting for a device (from a closed round, or this round's earlier copy):
        no device should train a round that is over."""
        try:
            dropped = self.transport.purge(topology.task_queue_name(device_id))
        except (AccessRefused, QueueNotFound):
            return
        if dropped:
            self.state.incr_counter(self.run_id, "tasks_purged", dropped)

    def _hparams(self) -> TrainHyperParams:
        return TrainHyperParams(**self.config.training.model_dump(), seed=self.config.seed)

    # -- end ------------------------------------------------------------------------------------
    def _finish(self, reason: FinishReason, final_round: int) -> None:
        metrics = self.state.get_round_metrics(self.run_id).get(final_round, {})
        accuracy = metrics.get("accuracy")
        wall = self.clock.now() - self._started_at
        for name, value in (
            ("final_round", final_round),
            ("final_accuracy", accuracy),
            ("finish_reason", reason),
            ("wall_time_s", wall),
            ("status", "finished"),
        ):
            self.state.put_run_field(self.run_id, name, value)
        finished = RunFinished(
            run_id=self.run_id, reason=reason, rounds_completed=final_round, final_accuracy=accuracy
        )
        for device_id in sorted(self.state.get_devices(self.run_id)):
            publish_message(self.transport, topology.TASKS_EXCHANGE, device_id, finished)
        self.report = build_report(self.config, self.state)
        if self.out_dir is not None:
            write_report(self.report, self.out_dir)
        expire_finished_run(self.state, self.run_id, self.config.state.retention_s, "orchestrator")
        self.phase = "finished"
        self.reporter.finished(reason, final_round, accuracy, wall)
