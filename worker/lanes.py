"""Training lanes: the devices of an embedded run train side by side, each lane a forked process.

An embedded run steps its services one after another (lorafleet/app/embedded.py), so its devices
used to train one after another on all the process's threads. With lanes, each device's trainer
lives in a process forked from the run once its model and shards are loaded (the frozen base
weights and the rows are shared copy-on-write, not copied), device ``i`` always in lane
``i % lanes`` (its prefix cache stays in one place), each lane on its own torch threads. A worker
that sees a task waiting *submits* it (:meth:`LaneTrainer.submit`, called by
``WorkerService.prefetch``) and collects the outcome when it handles the task as before, so every
message goes out in the order of a run without lanes and the results are the same: a task's
training depends only on its inputs and seed (worker/trainer.py), wherever it runs.

Two single-threaded lanes were 1.12x faster (13% less CPU) than one two-threaded process on MiniLM
at batch 16 on this 2-core host (benchmarks/results/system.md).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import queue
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import torch
from torch import Tensor

from schemas.messages import TrainMetrics, TrainTask
from worker.trainer import Trainer, TrainOutcome

#: how long a lane may take to exit when the run closes it, before it is killed
CLOSE_WAIT_S = 5.0


@dataclass(frozen=True)
class _Request:
    index: int  # which device's trainer
    task: TrainTask
    start: dict[str, Tensor]


@dataclass(frozen=True)
class _Result:
    task_id: str
    tensors: dict[str, Tensor] | None = None
    metrics: dict[str, Any] | None = None
    num_samples: int = 0
    error: str | None = None


class LaneFailed(RuntimeError):
    """A lane's training raised (the message names the error), or the lane process died."""


def _serve(requests: Any, results: Any, trainers: Sequence[Trainer], threads: int) -> None:
    """A lane's loop: train each request with its device's trainer, until a ``None`` request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's to handle; it closes the lanes
    torch.set_num_threads(threads)
    while (request := requests.get()) is not None:
        try:
            outcome = trainers[request.index].train(request.task, request.start)
        except Exception as exc:  # noqa: BLE001 - sent back: the worker turns it into a TaskFailed
            results.put(_Result(request.task.task_id, error=f"{type(exc).__name__}: {exc}"))
            continue
        results.put(
            _Result(
                request.task.task_id,
                outcome.tensors,
                outcome.metrics.model_dump(),
                outcome.num_samples,
            )
        )


def lane_plan(requested: int, threads: int, devices: int, cores: int) -> tuple[int, int]:
    """(lanes, torch threads per lane) for ``model.lanes`` = ``requested`` and ``model.torch_threads``
    = ``threads`` (0: unset) with ``devices`` devices on ``cores`` usable cores.

    ``requested`` 0 takes as many lanes of ``threads`` (or 1) threads as the cores hold; a lane count
    given shares the cores among its lanes unless ``threads`` is set. Never more lanes than devices;
    1 lane means training in the run's own process (no lanes).
    """
    if requested < 0 or threads < 0 or devices < 1 or cores < 1:
        raise ValueError(f"bad lane plan inputs: {requested=}, {threads=}, {devices=}, {cores=}")
    lanes = requested if requested > 0 else max(1, cores // (threads or 1))
    lanes = min(lanes, devices)
    return lanes, threads or max(1, cores // lanes)


class TrainingLanes:
    """``lanes`` forked processes that train the tasks of ``trainers[i]`` in lane ``i % lanes``.

    Create it after the trainers (and the model they share) are built and before anything else
    starts threads that the children would need; close it when the run ends.
    """

    def __init__(self, trainers: Sequence[Trainer], lanes: int, threads_per_lane: int = 1) -> None:
        if lanes < 1 or threads_per_lane < 1:
            raise ValueError(f"lanes and threads per lane must be >= 1, got {lanes} and {threads_per_lane}")
        context = multiprocessing.get_context("fork")
        self.lanes = lanes
        self._results: Any = context.Queue()
        self._requests: list[Any] = []
        self._processes: list[BaseProcess] = []
        for lane in range(lanes):
            requests = context.Queue()
            process = context.Process(
                target=_serve,
                args=(requests, self._results, trainers, threads_per_lane),
                name=f"lorafleet-lane-{lane}",
                daemon=True,
            )
            process.start()
            self._requests.append(requests)
            self._processes.append(process)
        self._lock = threading.Lock()
        self._done: dict[str, _Result] = {}
        self._submitted: dict[str, int] = {}  # task id -> lane, until its result comes back

    def submit(self, index: int, task: TrainTask, start: dict[str, Tensor]) -> None:
        """Queue ``task`` for device ``index``'s lane (once per task id)."""
        with self._lock:
            if task.task_id in self._submitted or task.task_id in self._done:
                return
            self._submitted[task.task_id] = index % self.lanes
        self._requests[index % self.lanes].put(_Request(index, task, start))

    def outcome(self, index: int, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        """The outcome of ``task`` (submitted now if it was not), waiting for its lane.

        Raises:
            LaneFailed: the training raised in its lane, or a lane died.
        """
        self.submit(index, task, start)
        while True:
            with self._lock:
                found = self._done.pop(task.task_id, None)
            if found is not None:
                break
            try:
                result: _Result = self._results.get(timeout=1.0)
            except queue.Empty:
                self._check_alive()
                continue
            with self._lock:
                self._submitted.pop(result.task_id, None)
                self._done[result.task_id] = result
        if found.error is not None or found.tensors is None or found.metrics is None:
            raise LaneFailed(found.error or f"lane sent no outcome for {task.task_id}")
        return TrainOutcome(found.tensors, TrainMetrics(**found.metrics), found.num_samples)

    def _check_alive(self) -> None:
        dead = [p.name for p in self._processes if not p.is_alive()]
        if dead:
            raise LaneFailed(f"training lane process(es) {', '.join(str(n) for n in dead)} exited")

    def close(self) -> None:
        """Stop every lane: an idle one is asked to exit, one still training (work nobody will
        collect now: tasks prefetched past the run's end, or a run interrupted) is killed at once."""
        with self._lock:
            busy = set(self._submitted.values())
        for lane, (requests, process) in enumerate(zip(self._requests, self._processes, strict=True)):
            if lane in busy:
                process.kill()
            elif process.is_alive():
                with contextlib.suppress(Exception):
                    requests.put(None)
        for process in self._processes:
            process.join(CLOSE_WAIT_S)
            if process.is_alive():
                process.kill()
                process.join(CLOSE_WAIT_S)
        for q in (*self._requests, self._results):
            q.close()
            q.cancel_join_thread()


class LaneTrainer:
    """Device ``index``'s trainer in a run with lanes: trains in the device's lane."""

    def __init__(self, lanes: TrainingLanes, index: int) -> None:
        self.lanes = lanes
        self.index = index

    def submit(self, task: TrainTask, start: dict[str, Tensor]) -> None:
        """Start training ``task`` in the lane now; :meth:`train` collects it."""
        self.lanes.submit(self.index, task, start)

    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        return self.lanes.outcome(self.index, task, start)
