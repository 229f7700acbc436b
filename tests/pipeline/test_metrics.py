"""The Prometheus metrics read what the services wrote: a whole in-process run, then a scrape, checked
against the run's report (one source of facts, two readers)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.app.metrics_server import metrics_registry
from lorafleet.app.worker_metrics import WorkerObserver
from lorafleet.run.metrics import RunCollector, histogram_buckets, run_facts
from lorafleet.run.report import build_report
from lorafleet.state.base import StateStoreError
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from tests.pipeline.helpers import build_pipeline, make_config
from tests.pipeline.test_hierarchy import fleet, hier_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: Any) -> Samples:
    """Every sample of the registry's exposition text: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def test_a_scrape_after_a_run_shows_what_its_report_shows() -> None:
    # Given a three-round run of three devices, a worker's trainer observed
    state = InMemoryStateStore()
    config = make_config("metrics", devices=3, rounds=3)
    broker = InMemoryBroker()
    pipeline = build_pipeline(
        config,
        [InMemoryTransport(broker) for _ in range(5)],
        state,
        deltas=[0.1, 0.2, 0.3],
        samples=[1, 2, 3],
    )
    run = RunCollector(state, "metrics", hierarchical=False, dead_letters=lambda: 7)
    registry = metrics_registry(run)
    observer = WorkerObserver(registry, "metrics")
    observer.collector.service = pipeline.workers[0]
    pipeline.workers[0].trainer = observer.wrap(pipeline.workers[0].trainer)
    pipeline.drive()
    report = build_report(config, state)

    # When /metrics is rendered
    samples = scrape(registry)

    # Then the run's numbers are the report's
    assert value(samples, "lorafleet_state_up") == 1
    assert value(samples, "lorafleet_rounds_closed_total", reason="quorum") == 3
    assert value(samples, "lorafleet_updates_total", outcome="counted") == report["updates"]["counted"] == 9
    assert value(samples, "lorafleet_bytes_up_total") == sum(r["bytes_up"] for r in report["rounds"]) > 0
    assert value(samples, "lorafleet_bytes_down_total") == sum(r["bytes_down"] for r in report["rounds"]) > 0
    assert value(samples, "lorafleet_round_duration_seconds_count") == 3
    assert value(samples, "lorafleet_round_duration_seconds_bucket", le="+Inf") == 3
    assert value(samples, "lorafleet_accuracy") == pytest.approx(report["final_accuracy"])
    assert value(samples, "lorafleet_loss") == pytest.approx(report["rounds"][-1]["loss"])
    assert value(samples, "lorafleet_evaluated_round") == value(samples, "lorafleet_round") == 3
    assert value(samples, "lorafleet_devices_registered") == 3
    assert value(samples, "lorafleet_dead_letter_queue_messages") == 7
    # ... and the observed worker's own: three tasks done and timed, its bytes, its latest round
    assert value(samples, "lorafleet_worker_tasks_total", outcome="done", device_id="dev-0000") == 3
    assert value(samples, "lorafleet_worker_training_seconds_count") == 3
    assert value(samples, "lorafleet_worker_bytes_up_total") == pipeline.workers[0].stats["bytes_up"] > 0
    assert value(samples, "lorafleet_worker_round") == 3
    assert value(samples, "process_resident_memory_bytes") > 0


def test_a_hierarchical_run_counts_device_rounds_once_and_global_rounds_apart() -> None:
    # Given a two-global-round hierarchical run
    state = InMemoryStateStore()
    config = hier_config("hier-metrics", rounds=2)
    fleet(config, state).drive()
    report = build_report(config, state)

    # When scraped
    samples = scrape(metrics_registry(RunCollector(state, "hier-metrics", hierarchical=True)))

    # Then bytes are the intra-group rounds' (which the global rounds' records sum up), once
    group_rounds = report["group_rounds"]
    assert value(samples, "lorafleet_bytes_up_total") == sum(r["bytes_up"] for r in group_rounds) > 0
    assert value(samples, "lorafleet_bytes_up_total") == sum(r["bytes_up"] for r in report["rounds"])
    closed = sum(v for (n, _), v in samples.items() if n == "lorafleet_rounds_closed_total")
    assert value(samples, "lorafleet_rounds_closed_total", reason="global") == 2
    assert closed == len(group_rounds) + 2
    assert value(samples, "lorafleet_round_duration_seconds_count") == len(group_rounds)
    assert value(samples, "lorafleet_evaluated_round") == 2


def test_run_facts_separate_outcomes_reasons_and_devices_rounds() -> None:
    counters = {"update_counted": 5, "update_duplicate": 1, "rejected_non_finite": 2, "task_failed": 1}
    metrics = {
        1: {
            "close_reason": "quorum",
            "opened_at": 10.0,
            "closed_at": 12.5,
            "bytes_up": 100,
            "bytes_down": 40,
            "accuracy": 0.5,
            "loss": 0.9,
        },
        2: {
            "close_reason": "deadline",
            "opened_at": 12.5,
            "closed_at": 42.5,
            "bytes_up": 50,
            "bytes_down": 40,
        },
        3: {"opened_at": 42.5, "bytes_down": 40},  # open: its tasks went out, nothing closed yet
    }
    facts = run_facts(counters, metrics, {"round": 3}, hierarchical=False)
    assert facts.updates == {"counted": 5, "duplicate": 1}
    assert facts.rejected == {"non_finite": 2}
    assert facts.tasks == {"failed": 1, "dropped": 0, "purged": 0}
    assert facts.rounds_closed == {"quorum": 1, "deadline": 1}
    assert (facts.bytes_up, facts.bytes_down) == (150, 120)
    assert facts.round_seconds == [2.5, 30.0]
    assert (facts.round, facts.evaluated_round, facts.accuracy, facts.loss) == (3, 1, 0.5, 0.9)


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    assert histogram_buckets([0.2, 1.0, 7.0, 99.0], (1.0, 10.0)) == [
        ("1.0", 2.0),
        ("10.0", 3.0),
        ("+Inf", 4.0),
    ]


class _DownStore(InMemoryStateStore):
    def get_counters(self, run_id: str) -> dict[str, int]:
        raise StateStoreError("redis is away")


def test_a_state_store_that_does_not_answer_gives_state_up_zero_not_a_failed_scrape() -> None:
    samples = scrape(metrics_registry(RunCollector(_DownStore(), "r", hierarchical=False)))
    assert value(samples, "lorafleet_state_up") == 0
    assert not any(n.startswith("lorafleet_updates") for n, _ in samples)
