"""Training lanes (worker/lanes.py): forked processes that train the tasks of their devices."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import Tensor

from schemas.messages import LoraSpec, TrainHyperParams, TrainTask
from schemas.tensors import encode_tensors
from worker.lanes import LaneFailed, LaneTrainer, TrainingLanes, lane_plan
from worker.trainer import FakeTrainer, Trainer, TrainOutcome


@pytest.mark.parametrize(
    ("requested", "threads", "devices", "cores", "plan"),
    [
        (0, 0, 8, 2, (2, 1)),  # auto: a lane per core, one thread each
        (0, 0, 8, 16, (8, 2)),  # never more lanes than devices; the cores shared among them
        (0, 2, 8, 8, (4, 2)),  # auto with torch_threads: as many lanes of that many threads as fit
        (0, 4, 8, 2, (1, 4)),  # one lane: train in the run's process
        (3, 0, 8, 12, (3, 4)),  # a count given shares the cores
        (1, 0, 8, 2, (1, 2)),
    ],
)
def test_lane_plan(requested: int, threads: int, devices: int, cores: int, plan: tuple[int, int]) -> None:
    assert lane_plan(requested, threads, devices, cores) == plan


def _task(device: int, task_id: str) -> TrainTask:
    start = {"w": torch.zeros(2)}
    return TrainTask(
        task_id=task_id,
        run_id="run",
        round=1,
        device_id=f"dev-{device:04d}",
        plan_version=0,
        lora=LoraSpec(target_modules=["query"], layer_ranks={0: 2}),
        hparams=TrainHyperParams(),
        adapter=encode_tensors(start),
        issued_at=0.0,
        deadline_at=1.0,
    )


class _Pid(FakeTrainer):
    """start + delta, and the pid of the process that trained, as a tensor."""

    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        outcome = super().train(task, start)
        outcome.tensors["pid"] = torch.tensor([os.getpid()])
        return outcome


class _Fails:
    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        raise ValueError(f"no rows for {task.device_id}")


def test_each_device_trains_in_its_own_lane_process_with_the_outcome_of_its_trainer() -> None:
    trainers: list[Trainer] = [_Pid(delta=float(i), num_samples=10 + i) for i in range(4)]
    lanes = TrainingLanes(trainers, lanes=2)
    try:
        workers = [LaneTrainer(lanes, i) for i in range(4)]
        tasks = [_task(i, f"t{i}") for i in range(4)]
        start = {"w": torch.zeros(2)}
        for worker, task in zip(workers, tasks, strict=True):
            worker.submit(task, start)
        # collected in any order: a result that comes first waits for its worker
        outcomes = [workers[i].train(tasks[i], start) for i in (3, 1, 2, 0)]
    finally:
        lanes.close()
    by_device = dict(zip((3, 1, 2, 0), outcomes, strict=True))
    for i, outcome in by_device.items():
        assert torch.equal(outcome.tensors["w"], torch.full((2,), float(i)))
        assert outcome.num_samples == 10 + i
    pids = {i: int(o.tensors["pid"]) for i, o in by_device.items()}
    assert os.getpid() not in pids.values()
    assert pids[0] == pids[2] != pids[1] == pids[3]  # device i in lane i % 2


def test_a_training_error_in_a_lane_reaches_the_worker_and_the_lane_goes_on() -> None:
    lanes = TrainingLanes([_Fails(), FakeTrainer(delta=1.0, num_samples=5)], lanes=1)
    try:
        with pytest.raises(LaneFailed, match="ValueError: no rows for dev-0000"):
            LaneTrainer(lanes, 0).train(_task(0, "a"), {"w": torch.zeros(2)})
        assert LaneTrainer(lanes, 1).train(_task(1, "b"), {"w": torch.zeros(2)}).num_samples == 5
    finally:
        lanes.close()


def test_a_lane_that_dies_is_an_error_not_a_hang() -> None:
    lanes = TrainingLanes([FakeTrainer(delta=1.0, num_samples=5, sleep_s=30.0)], lanes=1)
    try:
        trainer = LaneTrainer(lanes, 0)
        trainer.submit(_task(0, "a"), {"w": torch.zeros(2)})
        os.kill(lanes._processes[0].pid or 0, signal.SIGKILL)
        with pytest.raises(LaneFailed, match="exited"):
            trainer.train(_task(0, "a"), {"w": torch.zeros(2)})
    finally:
        lanes.close()


def test_closing_kills_a_lane_still_training_work_nobody_will_collect() -> None:
    lanes = TrainingLanes([FakeTrainer(delta=1.0, num_samples=5, sleep_s=60.0)], lanes=1)
    LaneTrainer(lanes, 0).submit(_task(0, "a"), {"w": torch.zeros(2)})
    process = lanes._processes[0]
    lanes.close()  # at once, not after the task's 60 s (nor after a grace period)
    assert not process.is_alive() and process.exitcode == -signal.SIGKILL
