"""Hierarchical (HierFedLoRA-style) runs with a fake trainer: exact aggregates, and the group and
global counters in the state store agreeing with report.json, on the twins and the real servers."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.hierarchical_service import merge_groups
from lorafleet.ml.lora import parse_key
from lorafleet.run.report import build_report
from lorafleet.run.round_numbers import intra_round, parse_round
from lorafleet.state.base import StateStore
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport.base import Transport
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from orchestrator.planners.specs import global_spec
from schemas.config import RunConfig
from schemas.tensors import tensors_from_bytes
from tests.pipeline.helpers import NUM_BLOCKS, Pipeline, build_pipeline, initial_adapter, make_config

DELTAS = [0.1, 0.2, 0.3, 1.0, 2.0, 4.0]
SAMPLES = [10, 20, 30, 40, 50, 60]
SPEEDS = [1.0, 1.0, 1.0, 0.1, 0.1, 0.1]  # a fast tier and a tier ten times slower
TOKENS_PER_SAMPLE = 32  # what the planner assumes for devices it has not seen: it predicts them right


def hier_config(run_id: str, rounds: int = 4, **hier: Any) -> RunConfig:
    return make_config(
        run_id,
        devices=6,
        rounds=rounds,
        extra={
            "strategy": "hierfedlora",
            "hier": {
                "groups": 2,
                "speed_weight": 10.0,
                "max_frequency": 3,
                "skew_frequency": False,
                "within_group": "uniform",  # the exact reference merges each group at its one depth
                **hier,
            },
        },
    )


def fleet(
    config: RunConfig, state: StateStore, transports: list[Transport] | None = None, **kw: Any
) -> Pipeline:
    """The six fake devices of these tests (two speed tiers) on ``state``, in-process by default."""
    options: dict[str, Any] = {
        "deltas": DELTAS,
        "samples": SAMPLES,
        "speeds": SPEEDS,
        "tokens_per_sample": TOKENS_PER_SAMPLE,
        **kw,
    }
    if transports is None:
        broker = InMemoryBroker()
        transports = [InMemoryTransport(broker) for _ in range(8)]
    return build_pipeline(config, transports, state, **options)


def expected_from_plan(config: RunConfig, report: dict[str, Any]) -> dict[str, np.ndarray]:
    """Independent computation from the plan in the report: a group of fake trainers adds its
    members' sample-weighted mean delta to the blocks it trains (and the head) once per intra-group
    round; the global merge takes, per tensor, the mean over the groups that trained it weighted by
    their samples, and moves (their samples / every contributing group's) ** aggregation_coverage of
    the way there."""
    coverage = config.coverage
    current = {
        k: v.numpy().astype(np.float64) for k, v in initial_adapter(global_spec(config, NUM_BLOCKS)).items()
    }
    index = {f"dev-{i:04d}": i for i in range(len(DELTAS))}
    for entry in report["rounds"]:
        sums = {k: np.zeros_like(v) for k, v in current.items()}
        weights = dict.fromkeys(current, 0.0)
        total = 0.0
        for g, group in entry["groups"].items():
            reported = [
                r["devices_reported"]
                for r in report["group_rounds"]
                if r["global_round"] == entry["round"] and r["group"] == int(g)
            ]
            if not any(reported):
                continue  # nobody in the group trained: it does not pull the merge
            members = [index[d] for d in group["devices"]]
            n = float(sum(SAMPLES[i] for i in members))
            total += n
            mean_delta = sum(SAMPLES[i] * DELTAS[i] for i in members) / n
            blocks = set(range(NUM_BLOCKS - group["depth"], NUM_BLOCKS))
            for key, value in current.items():
                block = parse_key(key).block
                if block is None or block in blocks:
                    sums[key] += n * (value + group["rounds_done"] * mean_delta)
                    weights[key] += n
        current = {
            k: v + (weights[k] / total) ** coverage * (sums[k] / weights[k] - v) if weights[k] else v
            for k, v in current.items()
        }
    return current


def check_exact_adapter(state: StateStore, config: RunConfig, report: dict[str, Any], rounds: int) -> None:
    """The stored global adapter is version ``rounds`` and exactly the independent computation."""
    stored = state.get_global_adapter(config.run_id)
    assert stored is not None and stored[0] == rounds
    got = tensors_from_bytes(stored[1])
    for key, value in expected_from_plan(config, report).items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=key)


def check_counters_agree(state: StateStore, config: RunConfig, report: dict[str, Any]) -> None:
    """The state store's group and global counters say what report.json's rounds say."""
    run_id = config.run_id
    assert state.global_aggregations(run_id) == report["final_round"] == len(report["rounds"])
    assert state.list_global_rounds(run_id) == [r["round"] for r in report["rounds"]]
    for entry in report["rounds"]:
        info = state.get_global_round(run_id, entry["round"])
        assert info is not None and info.status == "aggregated"
        for g, group in entry["groups"].items():
            assert info.counts[int(g)] == info.targets[int(g)] == group["rounds_done"]
            steps = [
                r
                for r in report["group_rounds"]
                if r["global_round"] == entry["round"] and r["group"] == int(g)
            ]
            assert [r["step"] for r in steps] == list(range(1, group["rounds_done"] + 1))
            for r in steps:
                assert r["round"] == intra_round(entry["round"], int(g), r["step"])
        assert entry["tasks_issued"] == sum(
            len(group["devices"]) * group["rounds_done"] for group in entry["groups"].values()
        )
    assert report["hierarchy"]["global_aggregations"] == len(report["rounds"])
    # the global round's virtual time is its slowest group's sum of intra-group round times
    for entry in report["rounds"]:
        per_group = {
            g: sum(
                r["virtual_round_s"]
                for r in report["group_rounds"]
                if r["global_round"] == entry["round"] and r["group"] == int(g)
            )
            for g in entry["groups"]
        }
        assert entry["virtual_round_s"] == pytest.approx(max(per_group.values()))


class Servers:
    def __init__(self, transports: list[Transport], state: StateStore, threaded: bool) -> None:
        self.transports, self.state, self.threaded = transports, state, threaded


@pytest.fixture(params=["memory", pytest.param("real", marks=[pytest.mark.rabbitmq, pytest.mark.redis])])
def servers(request: pytest.FixtureRequest, run_id: str) -> Iterator[Servers]:
    if request.param == "memory":
        broker = InMemoryBroker()
        yield Servers([InMemoryTransport(broker) for _ in range(8)], InMemoryStateStore(), threaded=False)
        return
    from lorafleet.state.redis import RedisStateStore
    from lorafleet.transport.rabbitmq import PikaTransport

    url = request.getfixturevalue("rabbitmq_url")
    state = RedisStateStore(request.getfixturevalue("redis_url"))
    transports: list[Transport] = [PikaTransport(url) for _ in range(8)]
    try:
        yield Servers(transports, state, threaded=True)
    finally:
        for t in transports:
            t.close()
        state.delete_run(run_id)
        state.close()


def run_to_end(servers: Servers, pipeline: Pipeline, timeout: float = 120.0) -> None:
    if not servers.threaded:
        pipeline.drive()
        return
    pipeline.run_threaded(timeout)


def test_a_hierarchical_run_aggregates_exactly_and_its_counters_agree_with_the_report(
    servers: Servers, run_id: str
) -> None:
    # Given six devices in two speed tiers, two groups, up to three intra-group rounds per global round
    config = hier_config(run_id)
    pipeline = fleet(config, servers.state, servers.transports)
    # When the run goes through its four global rounds
    run_to_end(servers, pipeline)
    report = build_report(config, servers.state)
    # Then: the first global round profiles (every group once, at the shallowest depth); later ones
    # follow the measured speeds: the fast group aggregates more often than the slow one
    assert report["final_round"] == 4 and report["finish_reason"] == "max_rounds"
    first = report["rounds"][0]["groups"]
    assert {(g["depth"], g["frequency"]) for g in first.values()} == {(1, 1)}
    later = report["rounds"][-1]["groups"]
    by_speed = {frozenset(g["devices"]): g for g in later.values()}
    fast, slow = (
        by_speed[frozenset(["dev-0000", "dev-0001", "dev-0002"])],
        by_speed[frozenset(["dev-0003", "dev-0004", "dev-0005"])],
    )
    assert fast["frequency"] > slow["frequency"]
    assert all(g["rounds_done"] == g["frequency"] for e in report["rounds"] for g in e["groups"].values())
    assert report["replans_on_drift"] == 0  # the planner predicted the fake devices' times
    # ... the counters in the state store agree with the report's rounds
    check_counters_agree(servers.state, config, report)
    # ... and the global adapter is exactly the independent computation from the plan
    check_exact_adapter(servers.state, config, report, 4)


@pytest.mark.parametrize(
    ("strategy", "check"),
    [
        ("hier_no_grouping", lambda groups: len(groups) == 1),
        ("hier_fixed_frequency", lambda groups: {g["frequency"] for g in groups.values()} == {2}),
        ("hier_fixed_depth", lambda groups: {g["depth"] for g in groups.values()} == {2}),
    ],
)
def test_the_ablations_plan_what_they_say(run_id: str, strategy: str, check: Any) -> None:
    config = make_config(
        run_id,
        devices=6,
        rounds=3,
        extra={
            "strategy": strategy,
            "hier": {"groups": 2, "max_frequency": 3, "fixed_frequency": 2, "fixed_depth": 2},
        },
    )
    state = InMemoryStateStore()
    pipeline = fleet(config, state)
    pipeline.drive()
    report = build_report(config, state)
    assert report["final_round"] == 3
    assert check(report["rounds"][-1]["groups"])  # measured rounds follow the ablation
    check_counters_agree(state, config, report)
    got = tensors_from_bytes(state.get_global_adapter(run_id)[1])  # type: ignore[index]
    for key, value in expected_from_plan(config, report).items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=key)


def test_a_group_faster_than_planned_gets_more_rounds_within_the_global_round(run_id: str) -> None:
    # Given fake devices that report no tokens: their rounds take far less than the planner predicts
    config = hier_config(run_id, rounds=3)
    state = InMemoryStateStore()
    pipeline = fleet(config, state, tokens_per_sample=0)
    # When the run goes on
    pipeline.drive()
    report = build_report(config, state)
    # Then the aggregator asked for replans on the drift, and the slow group, planned to aggregate
    # once per global round, was given more rounds to fill the period, and ran them
    assert report["replans_on_drift"] > 0
    slow = next(g for g in report["rounds"][-1]["groups"].values() if "dev-0005" in g["devices"])
    assert slow["frequency"] == 1 and slow["rounds_done"] > 1
    check_counters_agree(state, config, report)
    got = tensors_from_bytes(state.get_global_adapter(run_id)[1])  # type: ignore[index]
    for key, value in expected_from_plan(config, report).items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.redis
def test_lorafleet_status_shows_the_group_and_global_counters_in_redis(redis_url: str, run_id: str) -> None:
    from typer.testing import CliRunner

    from lorafleet.app.cli import app
    from lorafleet.state.redis import RedisStateStore

    # Given a hierarchical run whose state lives in the real Redis
    state = RedisStateStore(redis_url)
    try:
        config = hier_config(run_id, rounds=2)
        pipeline = fleet(config, state)
        pipeline.drive()
        report = build_report(config, state)
        # When `lorafleet status` reads it
        runner = CliRunner()
        shown = runner.invoke(app, ["status", "--state", redis_url, "--run", run_id, "--json"])
        table = runner.invoke(app, ["status", "--state", redis_url, "--run", run_id])
        missing = runner.invoke(app, ["status", "--state", redis_url, "--run", f"{run_id}-nope"])
    finally:
        state.delete_run(run_id)
        state.close()
    # Then it shows the counters the report was built from, and says when there is no such run
    assert shown.exit_code == 0, shown.output
    snapshot = json.loads(shown.output)
    assert snapshot["status"] == "finished" and snapshot["round"] == 2
    assert snapshot["hierarchy"] == report["hierarchy"]
    assert snapshot["counters"]["update_counted"] == sum(r["devices_reported"] for r in report["rounds"])
    assert table.exit_code == 0 and "global aggregations: 2" in table.output
    assert missing.exit_code == 1 and "no run" in missing.output


def _step_until(services: list[Any], done: Any, max_s: float = 60.0) -> None:
    deadline = time.monotonic() + max_s
    while not done():
        assert time.monotonic() < deadline, "the run did not get there in time"
        if not any(s.step(0.0) for s in services if not s.finished):
            time.sleep(0.002)


def _opened(state: StateStore, run_id: str, global_round: int) -> bool:
    return state.get_global_round(run_id, global_round) is not None


def test_devices_that_join_or_leave_are_grouped_again_and_the_run_goes_on(run_id: str) -> None:
    from tests.pipeline.helpers import make_worker

    # Given a hierarchical run that starts with five of its six devices
    config = make_config(
        run_id,
        devices=6,
        rounds=4,
        extra={"strategy": "hierfedlora", "hier": {"groups": 2, "max_frequency": 3}},
        min_devices=5,
    )
    broker, state = InMemoryBroker(), InMemoryStateStore()
    transports: list[Transport] = [InMemoryTransport(broker) for _ in range(8)]
    kw: dict[str, Any] = {
        "deltas": DELTAS,
        "samples": SAMPLES,
        "speeds": SPEEDS,
        "tokens_per_sample": TOKENS_PER_SAMPLE,
    }
    pipeline = build_pipeline(config, transports, state, workers=5, plan_live_only=True, **kw)
    services: list[Any] = pipeline.services
    _step_until(services, lambda: _opened(state, run_id, 2))
    # When the sixth device joins during global round 2 ...
    late = make_worker(config, 5, transports[7], **kw)
    late.start()
    services.append(late)
    _step_until(services, lambda: _opened(state, run_id, 3))
    # ... and dev-0001 vanishes during global round 3 (its lease runs out; it no longer works)
    services.remove(pipeline.workers[1])
    state.touch_device(run_id, "dev-0001", 0)
    _step_until(services, lambda: pipeline.aggregator.finished)
    report = build_report(config, state)
    # Then round 2 went on without the late device, round 3 was grouped again with it, and it trained
    members = [sorted(d for g in r["groups"].values() for d in g["devices"]) for r in report["rounds"]]
    assert "dev-0005" not in members[1] and "dev-0005" in members[2]
    metrics = state.get_round_metrics(run_id)
    trained_in_3 = {
        d for r in report["group_rounds"] if r["global_round"] == 3 for d in metrics[r["round"]]["devices"]
    }
    assert "dev-0005" in trained_in_3
    # ... dev-0001's open tasks were dropped, and round 4 was grouped again without it
    assert report["tasks_dropped"] >= 1
    assert "dev-0001" in members[2] and "dev-0001" not in members[3]
    assert report["final_round"] == 4 and report["finish_reason"] == "max_rounds"
    check_counters_agree(state, config, report)


class FailingFrom:
    """A trainer that fails every task from global round ``first`` on (its device reports TaskFailed)."""

    def __init__(self, inner: Any, first: int) -> None:
        self.inner, self.first = inner, first

    def train(self, task: Any, start: Any) -> Any:
        parsed = parse_round(task.round)
        if parsed is not None and parsed.global_round >= self.first:
            raise RuntimeError("this device fails")
        return self.inner.train(task, start)


def test_a_group_whose_devices_all_fail_does_not_pull_the_global_merge(run_id: str) -> None:
    # Given the slow devices failing every task from global round 2 on (when they form their own group)
    config = hier_config(run_id, rounds=3)
    state = InMemoryStateStore()
    pipeline = fleet(config, state)
    for worker in pipeline.workers[3:]:
        worker.trainer = FailingFrom(worker.trainer, first=2)
    # When the run goes on
    pipeline.drive()
    report = build_report(config, state)
    # Then their group's rounds closed with no update, and the global adapter is the other group's
    # merge alone (the independent computation skips a group nobody in it trained)
    slow = next(g for g in report["rounds"][-1]["groups"].values() if "dev-0005" in g["devices"])
    assert slow["devices"] == ["dev-0003", "dev-0004", "dev-0005"]
    assert report["tasks_failed"] >= 6
    got = tensors_from_bytes(state.get_global_adapter(run_id)[1])  # type: ignore[index]
    for key, value in expected_from_plan(config, report).items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize(
    ("histograms", "warned"),
    [
        ([[10, 0], [10, 0], [10, 0], [0, 10], [0, 10], [0, 10]], True),  # one class per speed tier
        ([[5, 5]] * 6, False),  # every device balanced
    ],
)
def test_groups_far_from_iid_are_warned_about_naming_the_setting(
    run_id: str, histograms: list[list[int]], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Given two groups whose speed term (speed_weight 10) keeps each speed tier together
    config = hier_config(run_id, rounds=2)
    state = InMemoryStateStore()
    # When the run is grouped from the devices' label histograms
    with caplog.at_level(logging.WARNING, logger="orchestrator.hierarchical_service"):
        pipeline = fleet(config, state, histograms=histograms)
        pipeline.drive()
    report = build_report(config, state)
    divergences = [g["divergence"] for g in report["rounds"][-1]["groups"].values()]
    warnings = [r.getMessage() for r in caplog.records if "far from IID" in r.getMessage()]
    # Then groups above hier.warn_divergence are warned about, with the setting to change; others not
    assert (max(divergences) > config.hier.warn_divergence) is warned
    assert bool(warnings) is warned
    if warned:
        assert "hier.groups is 2" in warnings[0] and "hier.warn_divergence 0.075" in warnings[0]


def test_a_hierarchical_run_whose_round_closes_are_all_lost_goes_on_from_the_store(
    run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a hierarchical run whose orchestrator never hears that a round closed: every RoundClosed,
    # and every ReplanRequest, is lost (an aggregator that died between its write and its publish, a
    # close announced from a state the store then lost)
    config = hier_config(run_id, rounds=2)
    state = InMemoryStateStore()
    pipeline = fleet(config, state)
    monkeypatch.setattr(pipeline.orchestrator, "_on_round_closed", lambda message: None)
    monkeypatch.setattr(pipeline.orchestrator, "_on_replan", lambda message: None)
    # When the services run
    _step_until(pipeline.services, lambda: pipeline.orchestrator.finished, max_s=90.0)
    _step_until([pipeline.aggregator], lambda: pipeline.aggregator.finished)
    # Then the orchestrator went on from what the store shows (its poll): every group did the rounds
    # it was planned, and the adapter is exactly the independent computation from the plan
    report = build_report(config, state)
    assert report["final_round"] == 2 and report["finish_reason"] == "max_rounds"
    assert all(g["rounds_done"] == g["frequency"] for e in report["rounds"] for g in e["groups"].values())
    check_counters_agree(state, config, report)
    check_exact_adapter(state, config, report, 2)


def test_a_hierarchical_run_the_store_lost_gets_it_back_from_the_snapshot(
    run_id: str, tmp_path: Path
) -> None:
    # Given a hierarchical run stepped by hand whose aggregator keeps snapshots, its first global round
    # aggregated and the second under way
    config = hier_config(run_id, rounds=3)
    state = InMemoryStateStore()
    pipeline = fleet(config, state, out_dir=tmp_path)
    _step_until(pipeline.services, lambda: _opened(state, run_id, 2))
    # When the store loses the run (a Redis restart without persistence)
    state.delete_run(run_id)
    # Then the aggregator restores its snapshot (stepped first: by hand, the orchestrator would wait
    # for the restore in this thread), the orchestrator resumes from it, and the run completes with
    # every group's planned rounds and the exact aggregate
    _step_until([pipeline.aggregator], lambda: state.get_counters(run_id).get("state_restored") == 1)
    _step_until(pipeline.services, lambda: pipeline.orchestrator.finished, max_s=90.0)
    _step_until([pipeline.aggregator], lambda: pipeline.aggregator.finished)
    report = build_report(config, state)
    assert report["final_round"] == 3 and report["finish_reason"] == "max_rounds"
    assert state.get_counters(run_id)["state_restored"] == 1
    assert all(g["rounds_done"] == g["frequency"] for e in report["rounds"] for g in e["groups"].values())
    check_counters_agree(state, config, report)
    check_exact_adapter(state, config, report, 3)


@pytest.mark.parametrize(("setting", "coverage"), [("auto", 1.0), (0.0, 0.0), (2.0, 2.0)])
def test_the_global_merge_applies_aggregation_coverage(
    run_id: str, monkeypatch: pytest.MonkeyPatch, setting: float | str, coverage: float
) -> None:
    # Given aggregation_coverage (auto, the default: 1 for a hierarchical run), and the global merge watched
    config = hier_config(run_id, rounds=3).model_copy(update={"aggregation_coverage": setting})
    assert hier_config(run_id, rounds=3).aggregation_coverage == "auto"
    seen: list[float] = []

    def watched(current: Any, groups: Any, coverage: float = 0.0) -> Any:
        seen.append(coverage)
        return merge_groups(current, groups, coverage)

    monkeypatch.setattr("aggregator.hierarchical_service.merge_groups", watched)
    state = InMemoryStateStore()
    pipeline = fleet(config, state)
    # When the run goes through its global rounds
    pipeline.drive()
    report = build_report(config, state)
    # Then every global merge got the setting, and the adapter is the independent computation with it
    assert seen == [coverage] * 3
    got = tensors_from_bytes(state.get_global_adapter(run_id)[1])  # type: ignore[index]
    for key, value in expected_from_plan(config, report).items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=key)
