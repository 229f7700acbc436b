"""Measured capacity (devices.emulate false): two devices that really differ in speed get different
LoRA depths from LEGEND-style plans built on their calibration and measured seconds."""

from __future__ import annotations

import time

from lorafleet.devices.costmodel import CostModel, cost_model_for
from lorafleet.run.report import build_report
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from orchestrator.planners.specs import lora_spec, top_ranks
from schemas.config import RunConfig, device_id, parse_run_config
from schemas.messages import TrainHyperParams, TrainTask
from tests.pipeline.helpers import NUM_BLOCKS, build_pipeline, initial_adapter
from worker.calibration import Calibration
from worker.service import WorkerService
from worker.trainer import FakeTrainer, TrainOutcome

SAMPLES = 20
TOKENS_PER_SAMPLE = 4096  # enough counted work that the LoRA depth matters to the cost model


class SlowTrainer:
    """A fake trainer on a device ``factor`` times slower than the cost model's host: it sleeps
    ``factor`` x the cost-model seconds of the work it counted (deeper LoRA: longer), and reports that
    as its measured compute, as a real trainer times its training."""

    def __init__(self, inner: FakeTrainer, cost: CostModel, factor: float) -> None:
        self.inner, self.cost, self.factor = inner, cost, factor

    def train(self, task: TrainTask, start: dict[str, object]) -> TrainOutcome:  # type: ignore[override]
        outcome = self.inner.train(task, start)  # type: ignore[arg-type]
        m = outcome.metrics
        host_s = self.cost.train_seconds(
            tokens=m.tokens,
            lowest_block=m.lowest_block,
            steps=m.steps,
            embed_tokens=m.embed_tokens,
            prefix_block_tokens=m.prefix_block_tokens,
        )
        began = time.perf_counter()
        time.sleep(self.factor * host_s)
        slept = time.perf_counter() - began
        metrics = m.model_copy(update={"compute_s": m.compute_s + slept})  # it times its training
        return TrainOutcome(outcome.tensors, metrics, outcome.num_samples)


def _config(emulate: bool | None) -> RunConfig:
    return parse_run_config(
        {
            "run_id": "measured",
            "strategy": "legend",
            "model": {"name": "tiny"},
            "data": {"dataset": "synthetic"},
            "devices": {"count": 2, "emulate": emulate},
            "lora": {"rank": 4},
            "rounds": {"max_rounds": 2},
        }
    )


def _measuring_worker(
    config: RunConfig, index: int, transport: InMemoryTransport, factor: float
) -> WorkerService:
    cost = cost_model_for(config.model.name, NUM_BLOCKS, config.model.tiny_hidden)
    trainer = SlowTrainer(
        FakeTrainer(delta=0.01, num_samples=SAMPLES, tokens_per_sample=TOKENS_PER_SAMPLE), cost, factor
    )
    specs = [lora_spec(config.lora, top_ranks(NUM_BLOCKS, d, config.lora.rank)) for d in (1, NUM_BLOCKS)]
    return WorkerService(
        transport,
        trainer,
        run_id=config.run_id,
        device_id=device_id(index),
        num_samples=SAMPLES,
        measure_times=config.device_times == "measured",
        calibration=Calibration(specs, TrainHyperParams(max_steps=3), initial_adapter),
    )


def _run(config: RunConfig, factors: list[float]) -> tuple[dict[str, object], InMemoryStateStore]:
    broker, state = InMemoryBroker(), InMemoryStateStore()
    transports = [InMemoryTransport(broker) for _ in range(2 + len(factors))]
    pipeline = build_pipeline(config, transports, state, deltas=[0.01] * 2, samples=[SAMPLES] * 2, workers=0)
    for i, factor in enumerate(factors):
        worker = _measuring_worker(config, i, transports[2 + i], factor)
        pipeline.workers.append(worker)
        worker.start()
    pipeline.drive()
    return build_report(config, state), state


def test_legend_gives_the_really_faster_device_the_deeper_lora_from_measured_times() -> None:
    # Given two measuring devices, dev-0000 five times slower than dev-0001 (real sleeps)
    config = _config(emulate=False)
    report, state = _run(config, factors=[5.0, 1.0])
    rounds = report["rounds"]
    assert isinstance(rounds, list) and len(rounds) == 2
    # Then the report says the plans used measured times
    assert report["times"] == "measured"
    # and the first plan, before any update, already follows the calibration: the fast device deeper
    assert rounds[0]["depths"] == {"dev-0000": 1, "dev-0001": NUM_BLOCKS}
    # and the updates carried real seconds: the slow device's compute about five times the fast's
    # per cost-model second (its shallower task still took longer), downloads timed
    measured = state.get_round_metrics(config.run_id)[1]["devices"]
    slow, fast = measured["dev-0000"], measured["dev-0001"]
    assert slow["device_compute_s"] > fast["device_compute_s"] > 0.05
    assert slow["downlink_s"] > 0 and fast["downlink_s"] > 0
    # and the virtual clock is the wall clock: a round lasts its slowest device's measured time
    assert rounds[0]["virtual_round_s"] >= slow["device_compute_s"]
    # and the second round's updates timed their upload (the first publish's rate)
    second = state.get_round_metrics(config.run_id)[2]["devices"]
    assert second["dev-0000"]["uplink_s"] > 0 and second["dev-0001"]["uplink_s"] > 0
    assert rounds[1]["depths"] == {"dev-0000": 1, "dev-0001": NUM_BLOCKS}


def test_an_emulated_run_ignores_real_calibration_seconds() -> None:
    # Given the same devices in an emulated run (no profiles: every device at the host's speed)
    config = _config(emulate=True)
    report, _ = _run(config, factors=[5.0, 1.0])
    # Then the first plan is the blind one (no estimates before an update) and the report says so
    assert report["times"] == "emulated"
    rounds = report["rounds"]
    assert isinstance(rounds, list)
    assert rounds[0]["depths"] == {"dev-0000": 1, "dev-0001": 1}
