"""Embedded mode: orchestrator, aggregator and every worker in one process.

The services are the same classes as in distributed mode, over the in-process transport and
state store. One base model is loaded, for all workers and the evaluator. A cooperative scheduler
steps every service until the run finishes; devices train side by side in training lanes (processes
forked once the model and the rows are loaded: worker/lanes.py, ``model.lanes``), with the same
messages in the same order, and so the same results, as one device after another.
"""

from __future__ import annotations

import functools
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from lorafleet.app.wiring import (
    Shards,
    build_aggregator,
    build_orchestrator,
    build_runtime,
    build_trainer,
    build_worker,
    device_rows,
    with_model_defaults,
)
from lorafleet.ml.cores import usable_cores
from lorafleet.ml.model import AdapterRuntime, configure_torch_threads
from lorafleet.run.progress import RunReporter
from lorafleet.run.recovery import snapshot_dir
from lorafleet.run.report import build_report, write_report
from lorafleet.security.signing import derive_device_key
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from schemas.config import RunConfig, device_id
from worker.lanes import LaneTrainer, TrainingLanes, lane_plan
from worker.service import WorkerService
from worker.trainer import Trainer

log = logging.getLogger(__name__)


#: the most steps a service takes in one pass of :func:`drive` while it has work
BURST = 64


class Steppable(Protocol):
    @property
    def finished(self) -> bool: ...

    def step(self, timeout: float = 0.0) -> bool: ...


def drive(
    services: Sequence[Steppable],
    *,
    until: Steppable,
    max_idle_s: float = 3600.0,
    idle_sleep_s: float = 0.005,
) -> None:
    """Step every service round-robin until ``until`` finishes.

    Raises:
        RuntimeError: nothing happened for ``max_idle_s`` seconds (a stuck run).
    """
    last_work = time.monotonic()
    while not until.finished:
        did = False
        for service in services:
            # a service with a backlog (the orchestrator's registrations, the aggregator's updates)
            # works up to BURST of it before the others step again: with one message per pass, a
            # fleet of n devices took n passes over n workers (quadratic in the fleet)
            for _ in range(BURST):
                if service.finished or not service.step(0.0):
                    break
                did = True
        if did:
            last_work = time.monotonic()
        elif time.monotonic() - last_work > max_idle_s:
            raise RuntimeError(f"embedded run made no progress for {max_idle_s:.0f} s")
        else:
            time.sleep(idle_sleep_s)


class Prefetch:
    """A step that lets every worker take its waiting task and start training it in its lane (so the
    lanes work side by side while the workers are stepped one after another)."""

    finished = False

    def __init__(self, workers: Sequence[WorkerService]) -> None:
        self.workers = workers

    def step(self, timeout: float = 0.0) -> bool:
        return any([worker.prefetch() for worker in self.workers])  # a list: every worker, no short cut


def run_embedded(
    config: RunConfig,
    out_dir: Path,
    *,
    quiet: bool = False,
    wrap_trainer: Callable[[int, Trainer], Trainer] | None = None,
    state: InMemoryStateStore | None = None,
    console: Console | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run a whole experiment in this process; returns the report (also written to ``out_dir``).

    ``state``: the run's state store (default: a new one), for a caller that watches it (metrics);
    ``console``: where the progress goes (default: stderr). The aggregator snapshots the run's state
    after every round into ``out_dir/state/`` (lorafleet/run/recovery.py); with ``resume`` the run goes
    on from the latest one (an interrupted run), else they are removed first. Interrupted (Ctrl-C:
    KeyboardInterrupt), the run writes its report so far (``finish_reason: interrupted``) and re-raises.
    """
    configure_torch_threads(config.model.torch_threads)
    state = InMemoryStateStore() if state is None else state
    if not resume:
        shutil.rmtree(snapshot_dir(out_dir), ignore_errors=True)
    reporter = RunReporter(config, quiet=quiet, console=console, state=state)
    try:
        return _run(config, out_dir, state, reporter, wrap_trainer)
    except KeyboardInterrupt:
        write_partial_report(config, state, out_dir)
        raise
    finally:
        reporter.close()


def write_partial_report(config: RunConfig, state: InMemoryStateStore, out_dir: Path) -> None:
    """The report of a run cut short, as far as it got (its rounds up to the last evaluated one, whose
    adapter is its checkpoint; ``finish_reason: interrupted``), written to ``out_dir``."""
    if state.get_run_fields(config.run_id).get("status") != "finished":
        evaluated = {n: m for n, m in state.get_round_metrics(config.run_id).items() if "accuracy" in m}
        last = max(evaluated, default=0)
        state.put_run_field(config.run_id, "final_round", last)
        state.put_run_field(config.run_id, "final_accuracy", evaluated[last]["accuracy"] if last else None)
        state.put_run_field(config.run_id, "finish_reason", "interrupted")
    write_report(build_report(config, state), out_dir)


def _run(
    config: RunConfig,
    out_dir: Path,
    state: InMemoryStateStore,
    reporter: RunReporter,
    wrap_trainer: Callable[[int, Trainer], Trainer] | None,
) -> dict[str, Any]:
    broker = InMemoryBroker()
    runtime = build_runtime(config)
    config = with_model_defaults(config, runtime)  # the LoRA targets the model resolved, in the report too
    shards = Shards.load(config)
    orchestrator = build_orchestrator(
        config, InMemoryTransport(broker), state, runtime, out_dir=out_dir, reporter=reporter, embedded=True
    )
    orchestrator.start()
    fleet_key = secrets.token_bytes(32) if config.security.require_signatures else None
    aggregator = build_aggregator(
        config,
        InMemoryTransport(broker),
        state,
        runtime,
        out_dir=out_dir,
        embedded=True,
        fleet_key=fleet_key,
        snapshots=True,  # what run_embedded(resume=True) goes on from
    )
    aggregator.start()
    lanes = start_lanes(config, runtime, shards)
    try:
        workers = [
            build_worker(
                config,
                i,
                InMemoryTransport(broker),
                runtime,
                shards,
                trainer=None if lanes is None else LaneTrainer(lanes, i),
                signing_key=None if fleet_key is None else derive_device_key(fleet_key, device_id(i)),
                wrap_trainer=None if wrap_trainer is None else functools.partial(wrap_trainer, i),
            )
            for i in range(config.devices.count)
        ]
        for worker in workers:
            worker.start()
        drive([orchestrator, aggregator, Prefetch(workers), *workers], until=orchestrator)
        # writes the final adapter and report (after the devices' evaluations of the last round, or
        # eval.wait_s)
        drive([aggregator], until=aggregator, max_idle_s=60.0 + config.eval.wait_s)
    finally:
        if lanes is not None:
            lanes.close()
    return build_report(config, state)


def start_lanes(config: RunConfig, runtime: AdapterRuntime, shards: Shards) -> TrainingLanes | None:
    """The run's training lanes (``model.lanes``; :func:`worker.lanes.lane_plan`), each device's
    trainer built before they fork; None for one lane (training in this process)."""
    count, threads = lane_plan(
        config.model.lanes, config.model.torch_threads, config.devices.count, usable_cores()
    )
    if count == 1:
        return None
    trainers = [
        build_trainer(config, runtime, device_rows(config, i, shards)[0]) for i in range(config.devices.count)
    ]
    log.info("training %d devices in %d lanes of %d torch thread(s)", len(trainers), count, threads)
    return TrainingLanes(trainers, count, threads)
