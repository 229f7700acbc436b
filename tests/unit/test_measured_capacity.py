"""Measured capacity: calibration probes -> a first estimate, the upload rate, the calibration run,
``devices.emulate`` and the registration schema (old workers still validate)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lorafleet.devices.costmodel import CostModel
from orchestrator.capacity import calibrated, update_estimate
from schemas.config import parse_run_config
from schemas.envelope import decode, encode
from schemas.measurement import DeviceMeasurement
from schemas.messages import CalibrationProbe, DeviceRegistered, LoraSpec, TrainHyperParams, TrainTask
from worker.calibration import Calibration
from worker.link_times import UploadRate
from worker.trainer import FakeTrainer, TrainOutcome

COST = CostModel("test", 4, embed_s=1e-6, prefix_block_s=2e-6, train_block_s=5e-6, head_s=1e-6, step_s=0.01)


def _probe(lowest_block: int, slowdown: float, tokens: int = 4000, steps: int = 3) -> CalibrationProbe:
    host_s = COST.train_seconds(
        tokens=tokens, lowest_block=lowest_block, steps=steps, embed_tokens=0, prefix_block_tokens=0
    )
    return CalibrationProbe(
        lowest_block=lowest_block,
        steps=steps,
        examples=tokens // 40,
        tokens=tokens,
        compute_s=slowdown * host_s,
    )


def test_calibration_probes_give_the_devices_slowdown_with_links_unknown() -> None:
    estimate = calibrated([_probe(3, 2.5), _probe(0, 2.5)], COST)
    assert estimate is not None
    assert estimate.slowdown == pytest.approx(2.5)
    assert estimate.tokens_per_sample == pytest.approx(40.0)
    assert math.isinf(estimate.down_bps) and math.isinf(estimate.up_bps)
    assert estimate.rounds_seen == 0


def test_calibration_weighs_probes_by_their_cost_model_seconds() -> None:
    # the deep probe costs more host seconds, so its slowdown weighs more than the shallow one's
    shallow, deep = _probe(3, 1.0), _probe(0, 3.0)
    host = [
        COST.train_seconds(
            tokens=p.tokens, lowest_block=p.lowest_block, steps=p.steps, embed_tokens=0, prefix_block_tokens=0
        )
        for p in (shallow, deep)
    ]
    estimate = calibrated([shallow, deep], COST)
    assert estimate is not None
    assert estimate.slowdown == pytest.approx((host[0] * 1.0 + host[1] * 3.0) / sum(host))
    assert 1.0 < estimate.slowdown < 3.0 and estimate.slowdown > 2.0


def test_a_rounds_estimate_wins_over_calibration_and_unusable_probes_give_none() -> None:
    first = calibrated([_probe(0, 2.0)], COST)
    assert first is not None
    assert calibrated([_probe(0, 9.0)], COST, previous=first) is first
    assert calibrated([], COST) is None
    outside = CalibrationProbe(lowest_block=7, steps=1, examples=1, tokens=10, compute_s=1.0)  # 4 blocks
    assert calibrated([outside], COST) is None


def test_the_first_update_folds_into_a_calibrated_estimate_and_measures_the_links() -> None:
    first = calibrated([_probe(0, 2.0)], COST)
    assert first is not None
    host_s = COST.train_seconds(tokens=8000, lowest_block=1, steps=5, embed_tokens=0, prefix_block_tokens=0)
    m = DeviceMeasurement(
        device_compute_s=4.0 * host_s,
        tokens=8000,
        embed_tokens=0,
        prefix_block_tokens=0,
        steps=5,
        examples=200,
        lowest_block=1,
        bytes_down=1_000_000,
        downlink_s=0.5,
        bytes_up=1_000_000,
        uplink_s=0.0,  # a measuring worker's first update: no upload timed yet
        device_time_s=4.0 * host_s + 0.5,
    )
    folded = update_estimate(first, m, COST, rho=0.5)
    assert folded is not None
    assert folded.slowdown == pytest.approx(3.0)
    assert folded.down_bps == pytest.approx(2_000_000.0)
    assert math.isinf(folded.up_bps)
    assert folded.rounds_seen == 1


def test_upload_rate_applies_the_last_publish_to_the_next_size() -> None:
    rate = UploadRate()
    assert rate.seconds(1000) == 0.0
    rate.observe(2000, 0.5)
    assert rate.seconds(1000) == pytest.approx(0.25)
    rate.observe(0, 3.0)  # nothing sent: nothing learned
    assert rate.seconds(4000) == pytest.approx(1.0)


def _spec(blocks: list[int]) -> LoraSpec:
    return LoraSpec(target_modules=["query"], layer_ranks=dict.fromkeys(blocks, 4))


def _zeros(spec: LoraSpec) -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(2)}


def _ticks(step: float) -> Iterator[float]:
    t = 0.0
    while True:
        yield t
        t += step


def test_the_calibration_probes_each_depth_with_the_trainers_seconds_and_counted_work() -> None:
    seen: list[TrainTask] = []

    class Recording(FakeTrainer):
        def train(self, task: TrainTask, start: dict[str, torch.Tensor]) -> TrainOutcome:
            seen.append(task)
            return super().train(task, start)

    calibration = Calibration([_spec([3]), _spec([0, 1, 2, 3])], TrainHyperParams(max_steps=2), _zeros)
    trainer = Recording(delta=0.0, num_samples=10, sleep_s=0.01, tokens_per_sample=8)
    probes = calibration.run(trainer, run_id="r", device_id="dev-0001")
    assert [p.lowest_block for p in probes] == [3, 0]
    assert all(p.compute_s >= 0.01 and p.tokens == 80 and p.examples == 10 for p in probes)
    # an untimed warm-up step at the deepest spec first, then each probe for its steps
    assert [(min(t.lora.layer_ranks), t.hparams.max_steps) for t in seen] == [(0, 1), (3, 2), (0, 2)]
    assert {t.device_id for t in seen} == {"dev-0001"}


def test_the_calibration_stops_at_its_budget_and_skips_a_failing_probe() -> None:
    class Failing(FakeTrainer):
        def train(self, task: TrainTask, start: dict[str, torch.Tensor]) -> TrainOutcome:
            if min(task.lora.layer_ranks) == 3:
                raise RuntimeError("out of memory")
            return super().train(task, start)

    specs = [_spec([3]), _spec([0, 1, 2, 3]), _spec([2, 3])]
    clock = _ticks(4.0)  # every reading 4 s later: the first probe has spent the 3 s budget
    over_budget = Calibration(specs[1:], TrainHyperParams(max_steps=1), _zeros, budget_s=3.0)
    trainer = FakeTrainer(0.0, 10, sleep_s=0.001)
    probes = over_budget.run(trainer, run_id="r", device_id="d", timer=lambda: next(clock))
    assert [p.lowest_block for p in probes] == [0]
    failing = Calibration(specs, TrainHyperParams(max_steps=1), _zeros, budget_s=100.0)
    probes = failing.run(Failing(0.0, 10, sleep_s=0.001), run_id="r", device_id="d")
    assert [p.lowest_block for p in probes] == [0, 2]


def test_an_old_workers_registration_validates_and_a_calibration_round_trips() -> None:
    old: dict[str, Any] = {"run_id": "r", "device_id": "dev-0000", "num_samples": 5}
    assert DeviceRegistered.model_validate(old).calibration == []
    probes = [_probe(0, 2.0), _probe(3, 2.0)]
    message = DeviceRegistered(run_id="r", device_id="dev-0000", num_samples=5, calibration=probes)
    back = decode(encode(message))
    assert isinstance(back, DeviceRegistered) and back.calibration == probes
    with pytest.raises(ValueError):
        CalibrationProbe(lowest_block=0, steps=1, examples=1, compute_s=0.0)  # no time: no probe


@pytest.mark.parametrize(
    ("source", "emulate", "times"),
    [
        ("partition", None, "emulated"),
        ("local", None, "measured"),
        ("partition", False, "measured"),
        ("local", True, "emulated"),
    ],
)
def test_device_times_follow_emulate_and_default_to_the_data_source(
    source: str, emulate: bool | None, times: str
) -> None:
    data: dict[str, Any] = {"dataset": "synthetic", "source": source}
    if source == "local":
        data["labels"] = ["negative", "positive"]
    config = parse_run_config({"data": data, "devices": {"emulate": emulate}})
    assert config.device_times == times


def test_the_model_takes_its_classes_from_data_labels_without_the_central_dataset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lorafleet.app import wiring

    built: list[int] = []

    def no_central_dataset(name: str) -> int:
        raise AssertionError(f"asked the central dataset {name} for its classes")

    monkeypatch.setattr(wiring, "num_labels", no_central_dataset)
    monkeypatch.setattr(wiring, "AdapterRuntime", lambda model, classes, seed: built.append(classes))
    labels = ["negative", "positive"]
    config = parse_run_config({"data": {"dataset": "sst2", "source": "local", "labels": labels}})
    wiring.build_runtime(config)
    assert built == [2]
