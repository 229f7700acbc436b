"""A run's Prometheus metrics, read from the state store at scrape time.

The services already write every fact a dashboard needs (counters, per-round metrics, devices and
leases); :class:`RunCollector` is a ``prometheus_client`` custom collector that reads them when
``/metrics`` is scraped, so any process with the state store (orchestrator, aggregator, ``lorafleet
run``) exposes the same numbers and a restarted process starts from the run's totals, not from zero.
:func:`run_facts` turns the stored records into those numbers (pure).

Device rounds are the rounds devices train in: every round of a flat run, the intra-group rounds of a
hierarchical one (a global round's record sums its groups' rounds, so it is not counted again).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from lorafleet.run.round_numbers import parse_round
from lorafleet.state.base import StateStore, StateStoreError

log = logging.getLogger(__name__)

#: Round duration buckets (seconds from a round's opening to its close).
ROUND_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass
class RunFacts:
    """What the state store says of a run, as metric values."""

    rounds_closed: dict[str, int] = field(default_factory=dict)  # close reason -> rounds
    updates: dict[str, int] = field(default_factory=dict)  # outcome -> updates
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> messages dead-lettered
    tasks: dict[str, int] = field(default_factory=dict)  # failed, dropped, purged
    bytes_up: int = 0
    bytes_down: int = 0
    round_seconds: list[float] = field(default_factory=list)  # device rounds, opening to close
    round: int = 0  # the run's current round (global round of a hierarchical run)
    evaluated_round: int | None = None
    accuracy: float | None = None
    loss: float | None = None


def is_device_round(round_no: int, hierarchical: bool) -> bool:
    """Whether devices trained in round ``round_no`` (not a hierarchical run's global round)."""
    return not hierarchical or parse_round(round_no) is not None


def run_facts(
    counters: Mapping[str, int],
    metrics: Mapping[int, Mapping[str, Any]],
    run_fields: Mapping[str, Any],
    *,
    hierarchical: bool,
) -> RunFacts:
    """The metric values of a run from its counters, round metrics and run record."""
    facts = RunFacts(round=int(run_fields.get("round") or 0))
    for name, value in counters.items():
        if name.startswith("update_"):
            facts.updates[name.removeprefix("update_")] = value
        elif name.startswith("rejected_"):
            facts.rejected[name.removeprefix("rejected_")] = value
    for name, counter in (("failed", "task_failed"), ("dropped", "task_dropped"), ("purged", "tasks_purged")):
        facts.tasks[name] = counters.get(counter, 0)
    for round_no, m in sorted(metrics.items()):
        reason = m.get("close_reason")
        if reason is not None:
            facts.rounds_closed[str(reason)] = facts.rounds_closed.get(str(reason), 0) + 1
        if m.get("accuracy") is not None and parse_round(round_no) is None:
            facts.evaluated_round, facts.accuracy, facts.loss = round_no, m["accuracy"], m.get("loss")
        if not is_device_round(round_no, hierarchical):
            continue
        facts.bytes_up += int(m.get("bytes_up", 0))
        facts.bytes_down += int(m.get("bytes_down", 0))
        if reason is not None and "opened_at" in m and "closed_at" in m:
            facts.round_seconds.append(max(0.0, float(m["closed_at"]) - float(m["opened_at"])))
    return facts


def histogram_buckets(values: list[float], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets (``le`` -> count) of ``values``, ending with ``+Inf``."""
    ordered = sorted(values)
    buckets = [(_le(b), float(bisect.bisect_right(ordered, b))) for b in bounds]
    return [*buckets, ("+Inf", float(len(ordered)))]


def _le(bound: float) -> str:
    return repr(float(bound))


class RunCollector(Collector):
    """The run's metrics from the state store, at each scrape (labels: ``run_id``).

    A state store that does not answer gives ``lorafleet_state_up 0`` and nothing else, instead of a
    failed scrape. ``dead_letters`` (optional) reads the broker's dead-letter queue depth.
    """

    def __init__(
        self,
        state: StateStore,
        run_id: str,
        *,
        hierarchical: bool,
        now: Callable[[], float] = time.time,
        dead_letters: Callable[[], int] | None = None,
    ) -> None:
        self.state = state
        self.run_id = run_id
        self.hierarchical = hierarchical
        self.now = now
        self.dead_letters = dead_letters

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only (registering must not read the state store)

    def collect(self) -> Iterator[Metric]:
        try:
            facts = run_facts(
                self.state.get_counters(self.run_id),
                self.state.get_round_metrics(self.run_id),
                self.state.get_run_fields(self.run_id),
                hierarchical=self.hierarchical,
            )
            registered = self.state.count_devices(self.run_id)
            expired = len(self.state.expired_devices(self.run_id, int(self.now() * 1000)))
        except StateStoreError as exc:
            log.warning("metrics: the state store did not answer: %s", exc)
            yield self._gauge("lorafleet_state_up", "1 if the state store answered this scrape", 0)
            return
        yield self._gauge("lorafleet_state_up", "1 if the state store answered this scrape", 1)
        yield from self._run_metrics(facts, registered, expired)
        if self.dead_letters is not None:
            yield from self._dead_letter_depth()

    def _run_metrics(self, facts: RunFacts, registered: int, expired: int) -> Iterator[Metric]:
        yield self._counter(
            "lorafleet_rounds_closed",
            "Rounds closed, by reason (quorum, deadline; global: a hierarchical run's global rounds)",
            facts.rounds_closed,
            "reason",
        )
        yield self._counter(
            "lorafleet_updates",
            "Updates recorded by the aggregator, by outcome (accepted: counted and recovered)",
            facts.updates,
            "outcome",
        )
        yield self._counter(
            "lorafleet_rejected",
            "Messages the services refused and dead-lettered, by reason (updates: the aggregator's)",
            facts.rejected,
            "reason",
        )
        yield self._counter("lorafleet_tasks", "Tasks failed, dropped or purged", facts.tasks, "outcome")
        yield self._counter(
            "lorafleet_bytes_up", "Bytes of updates received (device rounds)", {"": facts.bytes_up}
        )
        yield self._counter(
            "lorafleet_bytes_down", "Bytes of tasks sent (device rounds)", {"": facts.bytes_down}
        )
        histogram = HistogramMetricFamily(
            "lorafleet_round_duration_seconds",
            "Seconds from a device round's opening to its close",
            labels=["run_id"],
        )
        histogram.add_metric(
            [self.run_id],
            histogram_buckets(facts.round_seconds, ROUND_SECONDS_BUCKETS),
            sum(facts.round_seconds),
        )
        yield histogram
        yield self._gauge(
            "lorafleet_round", "The run's current round (global round if hierarchical)", facts.round
        )
        if facts.evaluated_round is not None:
            yield self._gauge(
                "lorafleet_evaluated_round", "The latest evaluated round", facts.evaluated_round
            )
            yield self._gauge("lorafleet_accuracy", "Accuracy of the latest evaluated round", facts.accuracy)
            yield self._gauge("lorafleet_loss", "Loss of the latest evaluated round", facts.loss)
        yield self._gauge("lorafleet_devices_registered", "Devices registered in the run", registered)
        yield self._gauge(
            "lorafleet_devices_alive", "Registered devices whose lease has not expired", registered - expired
        )

    def _dead_letter_depth(self) -> Iterator[Metric]:
        assert self.dead_letters is not None
        try:
            depth = self.dead_letters()
        except Exception as exc:  # noqa: BLE001 - a broker that does not answer must not fail the scrape
            log.warning("metrics: the dead-letter queue depth is unknown: %s", exc)
            return
        yield self._gauge(
            "lorafleet_dead_letter_queue_messages",
            "Messages in the broker's dead-letter queue (refused by a service or past the delivery limit)",
            depth,
        )

    def _gauge(self, name: str, documentation: str, value: float | None) -> Metric:
        gauge = GaugeMetricFamily(name, documentation, labels=["run_id"])
        gauge.add_metric([self.run_id], float("nan") if value is None else float(value))
        return gauge

    def _counter(self, name: str, documentation: str, values: Mapping[str, int], label: str = "") -> Metric:
        counter = CounterMetricFamily(name, documentation, labels=["run_id", label] if label else ["run_id"])
        for key, value in sorted(values.items()):
            counter.add_metric([self.run_id, key] if label else [self.run_id], float(value))
        return counter
