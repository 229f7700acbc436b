"""A worker's own metrics: what its process did, for ``lorafleet worker --metrics-port``.

A worker has no state-store access, so its metrics are process-local: the counts the
:class:`~worker.service.WorkerService` keeps (``stats``: tasks done, failed, stale, handed back, bytes
up; ``rejections``: messages it dead-lettered, per reason), read at scrape time by
:class:`WorkerCollector`, and the seconds each task trained, timed by :class:`ObservedTrainer` (the
trainer the service calls, wrapped), which also sets the log lines' ``round`` to the task's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from torch import Tensor

from lorafleet.app.logs import set_log_context
from schemas.messages import TrainTask
from worker.service import WorkerService
from worker.trainer import Trainer, TrainOutcome

#: WorkerService.stats keys -> the ``outcome`` label of ``lorafleet_worker_tasks_total``
TASK_OUTCOMES = {
    "tasks_done": "done",
    "tasks_failed": "failed",
    "stale_tasks": "stale",
    "tasks_handed_back": "handed_back",
}
TRAINING_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class WorkerCollector(Collector):
    """The worker service's counts at scrape time (nothing until ``service`` is set: a worker waiting
    for a free slot has served nothing yet)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.service: WorkerService | None = None
        self.round: int | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        service = self.service
        if service is None:
            return
        labels = ["run_id", "device_id"]
        ids = [self.run_id, service.device_id]
        stats = dict(service.stats)
        tasks = CounterMetricFamily(
            "lorafleet_worker_tasks", "Tasks this worker handled, by outcome", labels=[*labels, "outcome"]
        )
        for key, outcome in TASK_OUTCOMES.items():
            tasks.add_metric([*ids, outcome], float(stats.get(key, 0)))
        yield tasks
        up = CounterMetricFamily(
            "lorafleet_worker_bytes_up", "Bytes of updates this worker published", labels=labels
        )
        up.add_metric(ids, float(stats.get("bytes_up", 0)))
        yield up
        rejected = CounterMetricFamily(
            "lorafleet_worker_rejected",
            "Messages this worker dead-lettered, by reason",
            labels=[*labels, "reason"],
        )
        for reason, count in sorted(service.rejections.counts.items()):
            rejected.add_metric([*ids, reason], float(count))
        yield rejected
        if self.round is not None:
            current = GaugeMetricFamily(
                "lorafleet_worker_round", "The round of this worker's latest task", labels=labels
            )
            current.add_metric(ids, float(self.round))
            yield current


class ObservedTrainer:
    """A trainer that times every task (``lorafleet_worker_training_seconds``) and sets the round of
    the log context and of ``collector`` to the task's before training it."""

    def __init__(self, inner: Trainer, collector: WorkerCollector, seconds: Histogram) -> None:
        self.inner = inner
        self.collector = collector
        self.seconds = seconds

    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        set_log_context(round=task.round)
        self.collector.round = task.round
        began = time.perf_counter()
        try:
            return self.inner.train(task, start)
        finally:
            self.seconds.labels(task.run_id, task.device_id).observe(time.perf_counter() - began)


class WorkerObserver:
    """A worker's collector and training-time histogram, registered in ``registry``; :meth:`wrap` is
    ``build_worker``'s ``wrap_trainer``."""

    def __init__(self, registry: CollectorRegistry, run_id: str) -> None:
        self.collector = WorkerCollector(run_id)
        registry.register(self.collector)
        self.seconds = Histogram(
            "lorafleet_worker_training_seconds",
            "Seconds this worker trained each task (wall clock of its process)",
            labelnames=["run_id", "device_id"],
            buckets=TRAINING_SECONDS_BUCKETS,
            registry=registry,
        )

    def wrap(self, trainer: Trainer) -> Trainer:
        return ObservedTrainer(trainer, self.collector, self.seconds)
