"""One edge device: registers, takes its tasks, trains exactly the LoRA each names, reports.

The worker knows only the broker (least privilege: no state-store credentials). The task is
acked only after its update is confirmed by the broker, so a crash in between means a
redelivered task and a duplicate update (which the aggregator counts once), never a lost one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from lorafleet.devices.emulator import DeviceEmulator
from lorafleet.run.clock import Clock, SystemClock
from lorafleet.security.signing import sign
from lorafleet.transport import topology
from lorafleet.transport.base import (
    Delivery,
    ExchangeNotFound,
    QueueNotFound,
    Subscription,
    Transport,
    TransportError,
    Unroutable,
)
from lorafleet.transport.messaging import Rejections, publish_message, receive
from lorafleet.transport.waiting import wait_for_topology
from schemas.config import LimitsConfig
from schemas.envelope import encode
from schemas.errors import MessageRefused, Rejected
from schemas.messages import (
    CalibrationProbe,
    DeviceProfile,
    DeviceRegistered,
    Heartbeat,
    LoraUpdate,
    RegisterAgain,
    RunFinished,
    TaskFailed,
    TrainTask,
)
from schemas.tensors import decode_tensors, encode_tensors
from worker.calibration import Calibration
from worker.evaluation import DeviceEvaluator
from worker.link_times import UploadRate
from worker.trainer import Trainer

log = logging.getLogger(__name__)

_Report = TypeVar("_Report", LoraUpdate, TaskFailed)


class TrainingStopped(Exception):
    """The worker was told to stop while it trained (internal: the task is handed back)."""


class WorkerService:
    """A device's service loop. ``step`` handles at most one delivery."""

    def __init__(
        self,
        transport: Transport,
        trainer: Trainer,
        *,
        run_id: str,
        device_id: str,
        num_samples: int,
        label_histogram: list[int] | None = None,
        profile: DeviceProfile | None = None,
        limits: LimitsConfig | None = None,
        clock: Clock | None = None,
        incarnation: str = "0",
        emulator: DeviceEmulator | None = None,
        sleep_device_time: bool = False,
        on_finished: Callable[[], None] | None = None,
        signing_key: bytes | None = None,
        evaluator: DeviceEvaluator | None = None,
        measure_times: bool = False,
        calibration: Calibration | None = None,
    ) -> None:
        self.transport = transport
        # devices.emulate false: report the measured times (no emulator), calibrated at registration
        self.measure_times = measure_times
        self.calibration = calibration
        self._probes: list[CalibrationProbe] | None = None
        self._upload = UploadRate()
        self._arrived_at = 0.0  # perf_counter when the delivery in hand arrived
        self.evaluator = evaluator  # federated evaluation on held-out rows (worker/evaluation.py); None: off
        self.trainer = trainer
        self.run_id = run_id
        self.device_id = device_id
        self.num_samples = num_samples
        self.label_histogram = list(label_histogram or [])
        self.profile = profile or DeviceProfile()
        self.limits = limits or LimitsConfig()
        self.clock = clock or SystemClock()
        self.incarnation = incarnation
        self.emulator = emulator
        self.sleep_device_time = sleep_device_time
        self.on_finished = on_finished
        self.signing_key = signing_key  # this device's key (security/signing.py); None: unsigned
        self._stop: threading.Event | None = None  # set by run_forever: a stop interrupts training
        self._training: threading.Thread | None = None
        self.finished = False
        self.stats: Counter[str] = Counter()
        self.rejections = Rejections(f"worker {device_id}")
        self._subscription: Subscription | None = None
        self._held: Delivery | None = None  # taken off the queue by prefetch, handled by the next step
        self._completed: dict[str, LoraUpdate] = {}  # task id -> update already published
        self._busy_task: str | None = None
        self._heartbeat_seq = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, *, wait_s: float = 600.0, poll_s: float = 1.0) -> None:
        """Announce the device to the orchestrator.

        Where the broker did not load the definitions, the orchestrator declares the exchanges and
        queues; a worker that starts before it waits for them (up to ``wait_s``) instead of failing.
        A measuring worker calibrates first (once).
        """
        if self.calibration is not None and self._probes is None:
            self._probes = self.calibration.run(self.trainer, run_id=self.run_id, device_id=self.device_id)
        wait_for_topology(
            self._register,
            missing=(ExchangeNotFound, Unroutable),
            what=f"the orchestrator's topology (worker {self.device_id})",
            wait_s=wait_s,
            poll_s=poll_s,
            clock=self.clock,
        )

    def _register(self) -> None:
        registered = DeviceRegistered(
            run_id=self.run_id,
            device_id=self.device_id,
            num_samples=self.num_samples,
            label_histogram=self.label_histogram,
            profile=self.profile,
            incarnation=self.incarnation,
            eval_samples=0 if self.evaluator is None else self.evaluator.num_samples,
            calibration=self._probes or [],
        )
        exchange, key = topology.CONTROL_EXCHANGE, topology.register_key(self.device_id)
        publish_message(self.transport, exchange, key, registered)

    def heartbeat(self) -> None:
        """Tell the orchestrator this device is alive (and what it is working on)."""
        self._heartbeat_seq += 1
        publish_message(
            self.transport,
            topology.CONTROL_EXCHANGE,
            topology.heartbeat_key(self.device_id),
            Heartbeat(
                run_id=self.run_id,
                device_id=self.device_id,
                seq=self._heartbeat_seq,
                busy_task_id=self._busy_task,
            ),
        )

    def _subscribed(self) -> bool:
        if self._subscription is None:
            try:
                self._subscription = self.transport.subscribe(topology.task_queue_name(self.device_id))
            except QueueNotFound:
                return False  # the orchestrator declares it when it registers us
        return True

    def step(self, timeout: float = 0.0) -> bool:
        """Handle at most one delivery (none waiting: score a batch of a federated evaluation); True if
        there was work."""
        if self.finished or not self._subscribed():
            return False
        assert self._subscription is not None
        delivery, self._held = self._held, None
        if delivery is None:
            delivery = self._subscription.get(timeout if self.evaluator is None else 0.0)
        if delivery is None:
            return self._when_idle(timeout)
        self._handle(delivery)
        return True

    def prefetch(self) -> bool:
        """With a trainer that trains elsewhere (worker/lanes.py): take the waiting delivery off the
        queue and, for a task of this device, start its training now; the next :meth:`step` handles
        it as usual (and collects the outcome), so messages go out in the same order as without it.
        True if a delivery was taken."""
        submit = getattr(self.trainer, "submit", None)
        if submit is None or self.finished or self._held is not None or not self._subscribed():
            return False
        assert self._subscription is not None
        self._held = self._subscription.get(0.0)
        if self._held is None:
            return False
        try:
            message = receive(self._held, run_id=self.run_id, max_bytes=self.limits.max_message_bytes)
            if (
                isinstance(message, TrainTask)
                and message.device_id == self.device_id
                and self.clock.now() <= message.deadline_at
                and message.task_id not in self._completed
            ):
                submit(message, decode_tensors(message.adapter, max_bytes=self.limits.max_payload_bytes))
        except Exception:  # noqa: BLE001 - refused (and dead-lettered) or failed when step handles it
            log.debug("worker %s: delivery not prefetched", self.device_id, exc_info=True)
        return True

    def _when_idle(self, timeout: float) -> bool:
        """No task waits: score one batch of a federated evaluation (a task that comes meanwhile goes
        first at the next step), or else wait up to ``timeout`` for a task."""
        if self.evaluator is None:
            return False
        if self.evaluator.step():
            return True
        assert self._subscription is not None
        delivery = self._subscription.get(timeout)
        if delivery is None:
            return False
        self._handle(delivery)
        return True

    def run_forever(
        self, stop: threading.Event | None = None, *, poll_s: float = 0.5, heartbeat_s: float = 5.0
    ) -> None:
        """Loop until the run finishes or ``stop`` is set, with heartbeats from a side thread.

        ``stop`` is only read: services sharing one event (threads in one process) keep running when
        this worker finishes. The heartbeat thread has its own event, set when the loop ends."""
        stop = stop or threading.Event()
        self._stop = stop
        beating = threading.Event()
        beat = threading.Thread(
            target=self._beat,
            args=(stop, beating, heartbeat_s),
            daemon=True,
            name=f"heartbeat-{self.device_id}",
        )
        beat.start()
        try:
            while not self.finished and not stop.is_set():
                try:
                    if not self._subscribed():
                        stop.wait(poll_s)
                        continue
                    self.step(poll_s)
                except TransportError as exc:
                    log.warning("worker %s: transport error, retrying: %s", self.device_id, exc)
                    self._subscription = None
                    stop.wait(1.0)
        finally:
            beating.set()
            beat.join(timeout=5)

    def _beat(self, stop: threading.Event, done: threading.Event, every_s: float) -> None:
        while not done.wait(every_s) and not stop.is_set():
            try:
                self.heartbeat()
            except TransportError as exc:
                log.warning("worker %s: heartbeat not sent: %s", self.device_id, exc)

    # -- handling -------------------------------------------------------------------------------
    def _handle(self, delivery: Delivery) -> None:
        self._arrived_at = time.perf_counter()
        try:
            message = receive(delivery, run_id=self.run_id, max_bytes=self.limits.max_message_bytes)
            if isinstance(message, RunFinished):
                if self.evaluator is not None:  # the last round's evaluation goes out before we leave
                    self.evaluator.drain(message.rounds_completed)
                delivery.ack()
                self.finished = True
                if self.on_finished is not None:
                    self.on_finished()
                log.info("worker %s: run finished (%s)", self.device_id, message.reason)
            elif isinstance(message, TrainTask):
                self._handle_task(message, delivery)
            elif isinstance(message, RegisterAgain):
                if message.device_id != self.device_id:
                    raise Rejected("wrong_device", f"{message.device_id}'s request reached {self.device_id}")
                self._register()  # the run lost this device's registration
                delivery.ack()
                self.stats["registered_again"] += 1
            else:
                raise Rejected("unexpected_kind", f"a worker does not consume {type(message).__name__}")
        except MessageRefused as exc:
            self.rejections.reject(delivery, exc)

    def _handle_task(self, task: TrainTask, delivery: Delivery) -> None:
        if task.device_id != self.device_id:
            raise Rejected("wrong_device", f"task for {task.device_id} reached {self.device_id}")
        if self.clock.now() > task.deadline_at:
            self.stats["stale_tasks"] += 1  # its round closed already: training it helps nobody
            delivery.ack()
            return
        try:
            update = self._completed.get(task.task_id) or self._interruptible_train(task, len(delivery.body))
        except TrainingStopped:
            delivery.requeue()  # the task goes back to this device's queue, for the next worker of it
            self.stats["tasks_handed_back"] += 1
            log.info("worker %s: stopping; task %s handed back for redelivery", self.device_id, task.task_id)
            return
        if update is None:
            delivery.ack()  # a TaskFailed went out instead
            return
        try:
            published = time.perf_counter()
            sent = publish_message(
                self.transport, topology.UPDATES_EXCHANGE, topology.update_key(self.device_id), update
            )
            self._upload.observe(sent, time.perf_counter() - published)  # publish to confirm
            self.stats["bytes_up"] += sent
        except TransportError:
            delivery.requeue()  # not confirmed: try the task again (bounded by the delivery limit)
            raise
        self._completed = {task.task_id: update}
        delivery.ack()
        self.stats["tasks_done"] += 1

    def _interruptible_train(self, task: TrainTask, bytes_down: int) -> LoraUpdate | None:
        """:meth:`_train` in a thread of its own, so that a stop (SIGTERM, SIGINT) while it trains hands
        the task back at once instead of after minutes of training (the thread dies with the process).

        Raises:
            TrainingStopped: the worker was told to stop before training ended.
        """
        stop = self._stop
        if stop is None:
            return self._train(task, bytes_down)
        outcome: list[LoraUpdate | None] = []
        failure: list[BaseException] = []

        def work() -> None:
            try:
                outcome.append(self._train(task, bytes_down))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the service thread below
                failure.append(exc)

        thread = threading.Thread(target=work, daemon=True, name=f"train-{self.device_id}")
        self._training = thread
        thread.start()
        while thread.is_alive():
            if stop.wait(0.1) and thread.is_alive():
                raise TrainingStopped(task.task_id)
        if failure:
            raise failure[0]
        return outcome[0]

    @property
    def training_abandoned(self) -> bool:
        """A task was handed back while its training thread still runs (the process must end hard:
        torch's threads do not survive the interpreter's shutdown)."""
        return self._training is not None and self._training.is_alive()

    def _train(self, task: TrainTask, bytes_down: int) -> LoraUpdate | None:
        start = decode_tensors(task.adapter, max_bytes=self.limits.max_payload_bytes)
        received_s = time.perf_counter() - self._arrived_at  # message arrival to decoded tensors
        self._busy_task = task.task_id
        try:
            outcome = self.trainer.train(task, start)
        except Exception as exc:  # noqa: BLE001 - a failed task becomes a message, not a crash
            log.exception("worker %s: task %s failed", self.device_id, task.task_id)
            self._report_failure(task, f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self._busy_task = None
        update = LoraUpdate(
            task_id=task.task_id,
            run_id=task.run_id,
            round=task.round,
            device_id=self.device_id,
            plan_version=task.plan_version,
            num_samples=outcome.num_samples,
            adapter=encode_tensors(outcome.tensors),
            metrics=outcome.metrics,
        )
        if self.measure_times:
            return self._signed(self._with_measured_times(update, bytes_down, received_s))
        return self._signed(self._with_device_times(task, update, bytes_down))

    def _signed(self, report: _Report) -> _Report:
        if self.signing_key is None:
            return report
        return report.model_copy(update={"signature": sign(self.signing_key, report)})

    def _with_device_times(self, task: TrainTask, update: LoraUpdate, bytes_down: int) -> LoraUpdate:
        """Fill in the emulated device's times (virtual clock) and the bytes each way."""
        bytes_up = len(encode(update))  # the times below are fixed-size floats: the size stays the same
        fields: dict[str, object] = {"bytes_down": bytes_down, "bytes_up": bytes_up}
        if self.emulator is not None:
            m = update.metrics
            times = self.emulator.times(
                round_no=task.round,
                lowest_block=min(task.lora.layer_ranks),
                tokens=m.tokens,
                embed_tokens=m.embed_tokens,
                prefix_block_tokens=m.prefix_block_tokens,
                steps=m.steps,
                bytes_down=bytes_down,
                bytes_up=bytes_up,
            )
            fields.update(
                device_compute_s=times.compute_s, downlink_s=times.downlink_s, uplink_s=times.uplink_s
            )
            if self.sleep_device_time:
                self.clock.sleep(max(0.0, times.total_s - m.compute_s))
        return update.model_copy(update={"metrics": update.metrics.model_copy(update=fields)})

    def _with_measured_times(self, update: LoraUpdate, bytes_down: int, received_s: float) -> LoraUpdate:
        """Fill in the times this device measured (devices.emulate false) and the bytes each way: the
        compute is the trainer's own measure of its training (``compute_s``: without loading the
        adapter, a fixed cost per task that does not scale with the work the cost model counts)."""
        bytes_up = len(encode(update))
        fields: dict[str, object] = {
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
            "device_compute_s": update.metrics.compute_s,
            "downlink_s": received_s,
            "uplink_s": self._upload.seconds(bytes_up),
        }
        return update.model_copy(update={"metrics": update.metrics.model_copy(update=fields)})

    def _report_failure(self, task: TrainTask, reason: str) -> None:
        self.stats["tasks_failed"] += 1
        failed = TaskFailed(
            task_id=task.task_id,
            run_id=task.run_id,
            round=task.round,
            device_id=self.device_id,
            reason=reason[:2000],
        )
        key = topology.update_key(self.device_id)
        publish_message(self.transport, topology.UPDATES_EXCHANGE, key, self._signed(failed))
