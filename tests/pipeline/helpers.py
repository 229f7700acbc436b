"""A complete fake-trainer pipeline: real services, fake model (exactly checkable numbers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aggregator.hierarchical_service import aggregator_class
from aggregator.service import AggregatorService
from lorafleet.app.embedded import drive
from lorafleet.devices.costmodel import cost_model_for
from lorafleet.devices.emulator import DeviceEmulator
from lorafleet.ml.lora import Tensors
from lorafleet.security.signing import derive_device_key
from lorafleet.state.base import StateStore
from lorafleet.transport.base import Transport
from orchestrator.hierarchical_service import orchestrator_class
from orchestrator.service import OrchestratorService
from schemas.config import RunConfig, device_id, parse_run_config
from schemas.messages import DeviceProfile, EvalScore, LoraSpec
from worker.evaluation import DeviceEvaluator
from worker.service import WorkerService
from worker.trainer import FakeTrainer

NUM_BLOCKS = 2
HIDDEN = 8


def lora_key(block: int, module: str, factor: str) -> str:
    return f"base_model.model.bert.encoder.layer.{block}.attention.self.{module}.lora_{factor}.weight"


def initial_adapter(spec: LoraSpec, seed: int = 0) -> Tensors:
    """LoRA-shaped tensors for ``spec`` plus a 2-class head, seeded."""
    gen = torch.Generator().manual_seed(seed)
    out: Tensors = {}
    for block, rank in spec.layer_ranks.items():
        for module in spec.target_modules:
            out[lora_key(block, module, "A")] = torch.randn(rank, HIDDEN, generator=gen)
            out[lora_key(block, module, "B")] = torch.randn(HIDDEN, rank, generator=gen)
    out["base_model.model.classifier.weight"] = torch.randn(2, HIDDEN, generator=gen)
    out["base_model.model.classifier.bias"] = torch.randn(2, generator=gen)
    return out


class MeanEvaluator:
    """'Accuracy' from the adapter itself (deterministic, in [0, 1]); records what it saw."""

    def __init__(self) -> None:
        self.seen: list[Tensors] = []

    def evaluate(self, spec: LoraSpec, tensors: Tensors) -> tuple[float, float]:
        self.seen.append({k: v.clone() for k, v in tensors.items()})
        mean = float(torch.cat([t.flatten() for t in tensors.values()]).mean())
        return float(torch.sigmoid(torch.tensor(mean))), abs(mean)


def make_config(
    run_id: str, devices: int, rounds: int, *, extra: dict[str, Any] | None = None, **rounds_extra: Any
) -> RunConfig:
    """A tiny-model run config; ``rounds_extra`` goes into the ``rounds`` section, ``extra`` at the top."""
    return parse_run_config(
        {
            **(extra or {}),
            "run_id": run_id,
            "model": {"name": "tiny"},
            "data": {"dataset": "synthetic"},
            "devices": {"count": devices},
            "lora": {"rank": 4},
            "rounds": {"max_rounds": rounds, **rounds_extra},
        }
    )


@dataclass
class Pipeline:
    config: RunConfig
    orchestrator: OrchestratorService
    aggregator: AggregatorService
    workers: list[WorkerService]
    evaluator: MeanEvaluator
    deltas: list[float]
    samples: list[int]
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def services(self) -> list[Any]:
        return [self.orchestrator, self.aggregator, *self.workers]

    def drive(self) -> None:
        drive(self.services, until=self.orchestrator, max_idle_s=30)
        drive([self.aggregator], until=self.aggregator, max_idle_s=30)

    def start_threads(self, stop: threading.Event) -> None:
        """Each service in its own thread, as separate processes would run."""
        for service in self.services:
            thread = threading.Thread(
                target=service.run_forever, args=(stop,), kwargs={"poll_s": 0.05}, daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def run_threaded(self, timeout: float = 60.0) -> None:
        """Each service in its own thread until the orchestrator and the aggregator finish."""
        stop = threading.Event()
        self.start_threads(stop)
        deadline = time.monotonic() + timeout
        try:
            while not (self.orchestrator.finished and self.aggregator.finished):
                assert time.monotonic() < deadline, "the run did not finish in time"
                time.sleep(0.05)
        finally:
            stop.set()
            for thread in self.threads:
                thread.join(timeout=10)


def build_pipeline(
    config: RunConfig,
    transports: list[Transport],
    state: StateStore,
    *,
    deltas: list[float],
    samples: list[int],
    worker_clock: Any = None,
    fleet_key: bytes | None = None,
    speeds: list[float] | None = None,
    tokens_per_sample: int = 0,
    workers: int | None = None,
    plan_live_only: bool = False,
    histograms: list[list[int]] | None = None,
    out_dir: Path | None = None,
    restore_wait_s: float = 30.0,
) -> Pipeline:
    """``transports``: one per service (orchestrator, aggregator, then one per worker); ``workers``:
    start only the first so many devices (:func:`make_worker` makes the others later); ``out_dir``:
    where the aggregator keeps its state snapshots (none without it)."""
    evaluator = MeanEvaluator()
    orchestrator = orchestrator_class(config)(
        transports[0],
        state,
        config=config,
        num_blocks=NUM_BLOCKS,
        initial_adapter=initial_adapter,
        plan_live_only=plan_live_only,
        restore_wait_s=restore_wait_s,
    )
    aggregator = aggregator_class(config)(
        transports[1],
        state,
        config=config,
        evaluator=evaluator,
        fleet_key=fleet_key,
        out_dir=out_dir,
        restore_wait_s=restore_wait_s,
    )
    started = [
        make_worker(
            config,
            i,
            transports[2 + i],
            deltas=deltas,
            samples=samples,
            worker_clock=worker_clock,
            fleet_key=fleet_key,
            speeds=speeds,
            tokens_per_sample=tokens_per_sample,
            histograms=histograms,
        )
        for i in range(config.devices.count if workers is None else workers)
    ]
    orchestrator.start()
    aggregator.start()
    for worker in started:
        worker.start()
    return Pipeline(config, orchestrator, aggregator, started, evaluator, deltas, samples)


def make_worker(
    config: RunConfig,
    index: int,
    transport: Transport,
    *,
    deltas: list[float],
    samples: list[int],
    worker_clock: Any = None,
    fleet_key: bytes | None = None,
    speeds: list[float] | None = None,
    tokens_per_sample: int = 0,
    histograms: list[list[int]] | None = None,
) -> WorkerService:
    """Device slot ``index``'s worker with a fake trainer (not started); ``histograms``: the label
    histogram each device registers with (none by default)."""
    return WorkerService(
        transport,
        FakeTrainer(delta=deltas[index], num_samples=samples[index], tokens_per_sample=tokens_per_sample),
        run_id=config.run_id,
        device_id=device_id(index),
        num_samples=samples[index],
        clock=worker_clock,
        signing_key=None if fleet_key is None else derive_device_key(fleet_key, device_id(index)),
        label_histogram=None if histograms is None else histograms[index],
        **({} if speeds is None else _emulated(config, index, speeds[index])),
    )


def _emulated(config: RunConfig, index: int, speed: float) -> dict[str, Any]:
    """A worker's profile and emulator at ``speed`` (so its updates carry device times and the
    orchestrator forms capacity estimates)."""
    profile = DeviceProfile(speed=speed)
    cost = cost_model_for(config.model.name, NUM_BLOCKS, config.model.tiny_hidden)
    return {"profile": profile, "emulator": DeviceEmulator(device_id(index), profile, cost, seed=config.seed)}


def expected_global(spec: LoraSpec, rounds: int, deltas: list[float], samples: list[int]) -> dict[str, Any]:
    """Independent computation: each round adds the sample-weighted mean delta to every tensor."""
    import numpy as np

    start = {k: v.numpy().astype(np.float64) for k, v in initial_adapter(spec).items()}
    mean_delta = float(
        np.average(np.array(deltas, dtype=np.float64), weights=np.array(samples, dtype=np.float64))
    )
    return {k: v + rounds * mean_delta for k, v in start.items()}


class FixedScorer:
    """A device's held-out rows scored without a model (worker/evaluation.py's HeldOutScorer):
    ``batches`` batches of ``rows`` rows each, ``right`` of them right; notes each batch in ``log``."""

    def __init__(self, rows: int, right: int, batches: int = 1, log: list[str] | None = None) -> None:
        self.rows, self.right, self.n, self.log = rows, right, batches, log if log is not None else []

    @property
    def num_samples(self) -> int:
        return self.rows * self.n

    def batches(self) -> int:
        return self.n

    def check(self, spec: LoraSpec, tensors: Tensors) -> None:
        pass

    def scores(self, spec: LoraSpec, tensors: Tensors) -> Iterator[EvalScore]:
        for _ in range(self.n):
            self.log.append("score")
            yield EvalScore(
                num_samples=self.rows, correct=self.right, loss_sum=0.5 * self.rows, loss_count=self.rows
            )


HELD = [10, 20, 30]  # each fake device's held-out rows (evaluating_fleet)
RIGHT = [9, 10, 6]  # ... and how many of them every adapter gets right


def evaluating_fleet(
    config: RunConfig, transports: list[Transport], state: StateStore, fleet_key: bytes | None = None
) -> Pipeline:
    """A fake-trainer pipeline whose devices (at most three) hold ``HELD`` rows out for federated
    evaluation; ``transports`` as :func:`build_pipeline`'s."""
    options: dict[str, Any] = {"deltas": [0.1] * config.devices.count, "samples": [40] * config.devices.count}
    pipeline = build_pipeline(config, transports, state, fleet_key=fleet_key, workers=0, **options)
    for i in range(config.devices.count):
        worker = make_worker(config, i, transports[2 + i], fleet_key=fleet_key, **options)
        worker.evaluator = DeviceEvaluator(
            transports[2 + i],
            FixedScorer(HELD[i], RIGHT[i]),
            run_id=config.run_id,
            device_id=worker.device_id,
            signing_key=None if fleet_key is None else derive_device_key(fleet_key, worker.device_id),
        )
        worker.start()
        pipeline.workers.append(worker)
    return pipeline
