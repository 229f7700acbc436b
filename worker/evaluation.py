"""A device's part in federated evaluation: the global adapter scored on its held-out rows.

The aggregator fans an ``EvalTask`` out to every device's evaluation queue after each aggregated
round (a queue that keeps only the newest task). The worker takes one only when no training task
waits, and scores it one batch per step of its loop, so a training task that arrives meanwhile goes
first (the evaluation resumes after it): evaluation never delays a round. When every batch is scored
it publishes an ``EvalResult`` (counts only, signed like its updates) and acks the task; a worker that
dies mid-way leaves the task to be evaluated again by the device's next worker.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from lorafleet.data.datasets import EncodedDataset
from lorafleet.ml.lora import shape_mismatch
from lorafleet.ml.model import AdapterRuntime
from lorafleet.ml.scoring import eval_batches, score_batches
from lorafleet.security.signing import sign
from lorafleet.transport import topology
from lorafleet.transport.base import Delivery, QueueNotFound, Subscription, Transport, TransportError
from lorafleet.transport.messaging import Rejections, publish_message, receive
from schemas.config import LimitsConfig
from schemas.errors import DecodeError, MessageRefused, Rejected
from schemas.messages import EvalResult, EvalScore, EvalTask, LoraSpec
from schemas.tensors import decode_tensors

log = logging.getLogger(__name__)

#: how long a worker waits before it looks for its evaluation queue again
RESUBSCRIBE_S = 2.0


class HeldOutScorer(Protocol):
    """A device's held-out rows and the means to score an adapter on them, a batch at a time."""

    @property
    def num_samples(self) -> int: ...

    def batches(self) -> int:
        """How many batches :meth:`scores` yields."""
        ...

    def check(self, spec: LoraSpec, tensors: dict[str, Tensor]) -> None:
        """Raises DecodeError (``shape_mismatch``) unless ``tensors`` are an adapter of ``spec``."""
        ...

    def scores(self, spec: LoraSpec, tensors: dict[str, Tensor]) -> Iterator[EvalScore]:
        """Each batch's score, lazily."""
        ...


class HeldOutRows:
    """The real scorer: the worker's model runtime and its encoded held-out rows."""

    def __init__(self, runtime: AdapterRuntime, encoded: EncodedDataset) -> None:
        self.runtime = runtime
        self.encoded = encoded

    @property
    def num_samples(self) -> int:
        return len(self.encoded)

    def batches(self) -> int:
        return len(eval_batches(self.encoded))

    def check(self, spec: LoraSpec, tensors: dict[str, Tensor]) -> None:
        try:
            expected = self.runtime.expected_shapes(spec)
        except ValueError as exc:  # blocks or modules this model does not have
            raise DecodeError("shape_mismatch", str(exc)) from None
        problem = shape_mismatch(tensors, expected)
        if problem is not None:
            raise DecodeError("shape_mismatch", problem)

    def scores(self, spec: LoraSpec, tensors: dict[str, Tensor]) -> Iterator[EvalScore]:
        return score_batches(self.runtime, spec, tensors, self.encoded)


@dataclass
class _InProgress:
    delivery: Delivery
    task: EvalTask
    batches: Iterator[EvalScore]
    expected: int
    scores: list[EvalScore] = field(default_factory=list)


class DeviceEvaluator:
    """Takes a device's evaluation tasks and answers each with an ``EvalResult``; ``step`` scores one
    batch (taking the next task first when none is in progress) and says whether it did any work."""

    def __init__(
        self,
        transport: Transport,
        scorer: HeldOutScorer,
        *,
        run_id: str,
        device_id: str,
        limits: LimitsConfig | None = None,
        signing_key: bytes | None = None,
    ) -> None:
        self.transport = transport
        self.scorer = scorer
        self.run_id = run_id
        self.device_id = device_id
        self.limits = limits or LimitsConfig()
        self.signing_key = signing_key
        self.rejections = Rejections(f"worker {device_id} (evaluation)")
        self.evaluated: list[int] = []  # the rounds this device reported, in order
        self._subscription: Subscription | None = None
        self._retry_at = 0.0  # no subscription is tried before this (time.monotonic)
        self._current: _InProgress | None = None

    @property
    def num_samples(self) -> int:
        """The held-out rows (what the device registers as ``eval_samples``)."""
        return self.scorer.num_samples

    def step(self) -> bool:
        """Score the next batch of the evaluation in progress, or take the next task and score its first
        batch; True if there was anything to do."""
        try:
            if self._current is None and not self._take(0.0):
                return False
            if self._current is not None:
                self._advance()
            return True
        except TransportError as exc:
            log.warning("worker %s: evaluation paused, broker unavailable: %s", self.device_id, exc)
            self._drop_subscription()
            return False

    def drain(self, final_round: int, wait_s: float = 5.0) -> None:
        """Before the worker leaves (the run finished after ``final_round``): finish the evaluation in
        progress and evaluate the tasks still waiting, up to the final round's, waiting up to ``wait_s``
        for it."""
        deadline = time.monotonic() + wait_s
        try:
            while (self.evaluated[-1] if self.evaluated else 0) < final_round:
                if self._current is None and not self._take(max(0.0, deadline - time.monotonic())):
                    return
                while self._current is not None:
                    self._advance()
        except TransportError as exc:
            log.warning("worker %s: last evaluation not sent: %s", self.device_id, exc)

    # -- internals ------------------------------------------------------------------------------
    def _subscribed(self) -> Subscription | None:
        if self._subscription is None:
            if time.monotonic() < self._retry_at:
                return None
            try:
                self._subscription = self.transport.subscribe(topology.eval_queue_name(self.device_id))
            except QueueNotFound:  # the orchestrator declares it when it registers us
                self._retry_at = time.monotonic() + RESUBSCRIBE_S  # (a broker connection per try)
                return None
        return self._subscription

    def _drop_subscription(self) -> None:
        subscription, self._subscription, self._current = self._subscription, None, None
        if subscription is not None:
            with contextlib.suppress(TransportError):
                subscription.close()  # an evaluation in progress goes back to the queue

    def _take(self, timeout: float) -> bool:
        """Take the next evaluation task; True if a delivery came (refused or superseded ones too)."""
        subscription = self._subscribed()
        delivery = None if subscription is None else subscription.get(timeout)
        if delivery is None:
            return False
        try:
            task = receive(delivery, run_id=self.run_id, max_bytes=self.limits.max_message_bytes)
            if not isinstance(task, EvalTask):
                raise Rejected("unexpected_kind", f"an evaluation queue does not carry {type(task).__name__}")
            if self.evaluated and task.round <= self.evaluated[-1]:
                delivery.ack()  # a redelivery, or older than what this device reported already
                return True
            tensors = decode_tensors(task.adapter, max_bytes=self.limits.max_payload_bytes)
            self.scorer.check(task.lora, tensors)
        except MessageRefused as exc:
            self.rejections.reject(delivery, exc)
            return True
        batches = self.scorer.scores(task.lora, tensors)
        self._current = _InProgress(delivery, task, batches, self.scorer.batches())
        return True

    def _advance(self) -> None:
        """Score one batch; after the last, report and ack."""
        current = self._current
        assert current is not None
        try:
            current.scores.append(next(current.batches))
        except Exception:  # noqa: BLE001 - a failed evaluation is logged and dropped, never a crash
            log.exception("worker %s: evaluation of round %d failed", self.device_id, current.task.round)
            current.delivery.ack()
            self._current = None
            return
        if len(current.scores) < current.expected:
            return
        result = EvalResult(
            run_id=self.run_id,
            round=current.task.round,
            device_id=self.device_id,
            score=EvalScore.total(current.scores),
        )
        if self.signing_key is not None:
            result = result.model_copy(update={"signature": sign(self.signing_key, result)})
        try:
            publish_message(
                self.transport, topology.UPDATES_EXCHANGE, topology.update_key(self.device_id), result
            )
        except TransportError:
            current.delivery.requeue()  # evaluated again later
            self._current = None
            raise
        current.delivery.ack()
        self._current = None
        self.evaluated.append(current.task.round)
        log.info(
            "worker %s: round %d evaluated on %d held-out rows: accuracy %.4f loss %.4f",
            self.device_id,
            current.task.round,
            result.score.num_samples,
            result.score.accuracy,
            result.score.loss,
        )
