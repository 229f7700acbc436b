"""Workers of one host take turns at training (worker/host_turns.py): never more than ``count`` at once,
a killed holder's turn comes back, a worker in its own process gives a task's freed memory back, and
``lorafleet run --broker`` gives its workers one turn a core when there are more workers than cores."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from aggregator.evaluation import Evaluation
from lorafleet.app import launcher
from schemas.config import load_run_config
from schemas.errors import ConfigError
from schemas.messages import TrainMetrics, TrainTask
from worker.host_turns import HostTurns, TakingTurns
from worker.trainer import TrainOutcome

REPO = Path(__file__).resolve().parents[2]

#: a process that takes a turn of ``sys.argv[1]`` (count ``sys.argv[2]``), says so, and holds it
HOLDER = """
import sys, time
from pathlib import Path
from worker.host_turns import HostTurns
with HostTurns(Path(sys.argv[1]), int(sys.argv[2])).turn() as index:
    Path(sys.argv[3]).write_text(str(index))
    time.sleep(600)
"""


def _holder(tmp_path: Path, count: int, marker: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "turns"), str(count), str(marker)], env=env
    )


@contextlib.contextmanager
def _one_turn_held_by_another_process(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The only turn of ``tmp_path/turns``, taken by a holder process (continued and killed after)."""
    marker = tmp_path / "took"
    holder = _holder(tmp_path, 1, marker)
    try:
        assert _wait_for(marker, 30.0), "the holder never took its turn"
        yield holder
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()


def _wait_for(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.02)
    return False


def _free(turns: HostTurns, index: int) -> bool:
    """Whether turn ``index`` is free now (taken and given back at once if so)."""
    fd = os.open(turns.path(index), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_a_worker_waits_while_every_turn_is_taken_and_takes_one_freed(tmp_path: Path) -> None:
    turns = HostTurns(tmp_path / "turns", 2)
    marker = tmp_path / "took"
    with turns.turn() as first, turns.turn() as second:
        assert {first, second} == {0, 1}
        holder = _holder(tmp_path, 2, marker)
        try:
            assert not _wait_for(marker, 1.0), "a third worker trained while both turns were taken"
        except BaseException:
            holder.kill()
            raise
    try:
        assert _wait_for(marker, 10.0), "the waiting worker never took the freed turn"
        assert marker.read_text() in {"0", "1"}
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_worker_gives_its_turn_back(tmp_path: Path) -> None:
    turns = HostTurns(tmp_path / "turns", 1)
    marker = tmp_path / "took"
    holder = _holder(tmp_path, 1, marker)
    try:
        assert _wait_for(marker, 30.0), "the holder never took its turn"
        assert not _free(turns, 0)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    took: list[int] = []
    waiter = threading.Thread(target=lambda: took.append(turns.turn().__enter__()), daemon=True)
    waiter.start()
    waiter.join(timeout=5.0)
    assert took == [0], "the turn of a killed worker was never given back"


def test_a_stopped_worker_lends_its_turn_to_one_waiting_worker_at_a_time(tmp_path: Path) -> None:
    turns = HostTurns(tmp_path / "turns", 1)
    with _one_turn_held_by_another_process(tmp_path) as holder:
        holder.send_signal(signal.SIGSTOP)  # it keeps the lock, and uses no core
        took: list[int] = []
        entered = threading.Event()
        release = threading.Event()

        def borrow() -> None:
            with turns.turn() as index:
                took.append(index)
                entered.set()
                release.wait(30.0)

        first = threading.Thread(target=borrow, daemon=True)
        first.start()
        assert entered.wait(5.0), "no worker trained in the place of the stopped one"
        # while one worker trains in its place, a second waits
        entered.clear()
        second = threading.Thread(target=borrow, daemon=True)
        second.start()
        assert not entered.wait(0.5), "two workers trained in the place of one stopped worker"
        release.set()
        first.join(5.0)
        assert entered.wait(5.0), "the lent turn was not lent again after the first borrower's task"
        second.join(5.0)
        assert took == [0, 0]


def test_a_stale_holder_record_lends_nothing(tmp_path: Path) -> None:
    turns = HostTurns(tmp_path / "turns", 1)
    with _one_turn_held_by_another_process(tmp_path) as holder:
        pid, started = turns.path(0).read_text().split()
        assert int(pid) == holder.pid
        # the same pid with another start time (a reused pid, another namespace): not the holder
        turns.path(0).write_text(f"{pid} {int(started) + 1}")
        holder.send_signal(signal.SIGSTOP)
        took: list[int] = []
        waiter = threading.Thread(target=lambda: took.append(turns.turn().__enter__()), daemon=True)
        waiter.start()
        waiter.join(timeout=1.0)
        assert took == [], "a worker trained in the place of a holder it could not name"


class _Inner:
    """A trainer that records whether a turn was held while it trained."""

    def __init__(self, turns: HostTurns, fail: bool = False) -> None:
        self.turns, self.fail = turns, fail
        self.free_while_training: list[bool] = []

    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        self.free_while_training.append(_free(self.turns, 0))
        if self.fail:
            raise RuntimeError("out of memory")
        return TrainOutcome(
            dict(start), TrainMetrics(train_loss=0.0, steps=1, examples=3, compute_s=0.1), num_samples=3
        )


def test_a_trainer_trains_in_a_turn_and_gives_memory_back_after_each_task(tmp_path: Path) -> None:
    turns = HostTurns(tmp_path / "turns", 1)
    after: list[int] = []
    task: Any = None  # the inner trainer reads nothing of it
    for fail in (False, True):
        inner = _Inner(turns, fail=fail)
        trainer = TakingTurns(inner, turns, after=lambda: after.append(1))
        if fail:
            with pytest.raises(RuntimeError, match="out of memory"):
                trainer.train(task, {"w": torch.zeros(2)})
        else:
            assert trainer.train(task, {"w": torch.zeros(2)}).num_samples == 3
        assert inner.free_while_training == [False], "the task trained outside a turn"
        assert _free(turns, 0), "the turn was kept after the task"
    assert after == [1, 1], "memory was not given back after a task (failed or not)"


def test_turns_need_a_count_and_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        HostTurns(tmp_path, 0)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="turns directory"):
        HostTurns(tmp_path / "file" / "turns", 2)


#: frees 192 MiB of small blocks of a thread's arena (keeping the last, so the top cannot shrink) and
#: prints the resident MiB before and after release_free_memory
FRAGMENTED = """
import ctypes, threading
from lorafleet.app.malloc import TRAINING_MMAP_THRESHOLD_BYTES, pin_mmap_threshold, release_free_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
pin_mmap_threshold(TRAINING_MMAP_THRESHOLD_BYTES)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
def work():
    blocks = [libc.malloc(64 * 1024) for _ in range(3072)]
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    for b in blocks[:-1]:
        libc.free(b)
    before = rss()
    release_free_memory()
    print(before, rss())
thread = threading.Thread(target=work)
thread.start()
thread.join()
"""


def test_release_free_memory_gives_a_threads_freed_blocks_back() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENTED], env=env, capture_output=True, text=True, check=True
    )
    before, after = map(float, out.stdout.split())
    assert before - after > 120, f"resident {before:.0f} MiB -> {after:.0f} MiB after malloc_trim"


def test_more_workers_than_cores_take_one_turn_a_core() -> None:
    assert launcher.host_turns(8, 2) == 2
    assert launcher.host_turns(2, 4) == 2
    assert launcher.host_turns(1, 1) == 1


def test_the_launcher_gives_workers_and_evaluation_turns_only_where_there_are_more_workers_than_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: dict[str, list[str]] = {}

    class FakeSupervisor:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.children: dict[str, object] = {}

        def start(self, name: str, command: list[str]) -> None:
            started[name] = command

        def stop_all(self) -> None:
            pass

    def supervise(*args: object, **kwargs: object) -> None:
        (tmp_path / "report.json").write_text(json.dumps({"ok": True}))

    monkeypatch.setattr(launcher, "reset_run", lambda *args: None)
    monkeypatch.setattr(launcher, "Supervisor", FakeSupervisor)
    monkeypatch.setattr(launcher, "zygote", lambda env: None)
    monkeypatch.setattr(launcher, "_supervise", supervise)
    config = load_run_config(REPO / "examples" / "tiny.yaml")
    workers = config.devices.count
    for cores, turns in ((1, 1), (workers, None)):
        started.clear()
        monkeypatch.setattr(launcher, "usable_cores", lambda cores=cores: cores)
        launcher.run_distributed(
            config, REPO / "examples" / "tiny.yaml", tmp_path, broker="amqp://x", state="redis://x"
        )
        commands = [command for name, command in started.items() if name.startswith("worker-")]
        assert len(commands) == workers
        for command in [*commands, started["aggregator"]]:  # its evaluation takes turns too
            if turns is None:
                assert "--turns" not in command
            else:
                assert command[command.index("--turns") + 1] == str(turns)
                assert command[command.index("--threads") + 1] == "1"
        assert "--turns" not in started["orchestrator"]


def test_the_aggregator_evaluates_in_a_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafleet.app import wiring

    turns = HostTurns(tmp_path / "turns", 1)
    free_while_evaluating: list[bool] = []

    def evaluate(*args: object) -> Evaluation:
        free_while_evaluating.append(_free(turns, 0))
        return Evaluation(0.5, 0.7)

    monkeypatch.setattr(wiring, "evaluate", evaluate)
    spec: Any = None
    for with_turns in (True, False):
        runtime: Any = None
        evaluator = wiring.RuntimeEvaluator(runtime, runtime, turns if with_turns else None)
        assert evaluator.evaluate(spec, {}) == (0.5, 0.7)
    assert free_while_evaluating == [False, True]
    assert _free(turns, 0), "the turn was kept after the evaluation"
