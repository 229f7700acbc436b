"""The supervisor restarts a dead child with its command, and gives up on a crash loop, naming it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pytest

from lorafleet.app.supervisor import CrashLoop, FatalExit, RestartPolicy, Supervisor
from lorafleet.run.clock import FakeClock


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None
        self.terminated = False

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.terminated = True
        self.code = -15

    def kill(self) -> None:
        self.code = -9

    def wait(self, timeout: float | None = None) -> int:
        assert self.code is not None
        return self.code


class Spawner:
    def __init__(self) -> None:
        self.started: list[tuple[list[str], FakeProcess]] = []

    def __call__(self, command: Sequence[str], log_file: IO[bytes]) -> FakeProcess:
        log_file.write(f"started {' '.join(command)} #{len(self.started)}\n".encode())
        process = FakeProcess(len(self.started))
        self.started.append((list(command), process))
        return process


def _supervisor(tmp_path: Path, clock: FakeClock) -> tuple[Supervisor, Spawner]:
    spawner = Spawner()
    policy = RestartPolicy(max_crashes=3, window_s=60)
    return Supervisor(tmp_path, policy=policy, clock=clock, spawn=spawner), spawner


def test_a_killed_child_is_started_again_with_the_same_command(tmp_path: Path) -> None:
    supervisor, spawner = _supervisor(tmp_path, FakeClock())
    supervisor.start("worker-dev-0000", ["lorafleet", "worker", "--device-id", "dev-0000"])
    supervisor.start("orchestrator", ["lorafleet", "orchestrator"])
    # When the worker is SIGKILLed
    spawner.started[0][1].code = -9
    # Then it is started again, with the same command, and the orchestrator is left alone
    assert supervisor.check() == ["worker-dev-0000"]
    assert spawner.started[2][0] == ["lorafleet", "worker", "--device-id", "dev-0000"]
    assert supervisor.alive("worker-dev-0000") and supervisor.children["worker-dev-0000"].restarts == 1
    assert supervisor.check() == []


def test_a_child_that_exits_zero_is_done_not_restarted(tmp_path: Path) -> None:
    supervisor, spawner = _supervisor(tmp_path, FakeClock())
    supervisor.start("aggregator", ["lorafleet", "aggregator"])
    spawner.started[0][1].code = 0
    assert supervisor.check() == []
    assert supervisor.done("aggregator") and len(spawner.started) == 1


def test_restart_can_be_refused_per_child(tmp_path: Path) -> None:
    supervisor, spawner = _supervisor(tmp_path, FakeClock())
    supervisor.start("worker-dev-0001", ["w"])
    spawner.started[0][1].code = -9
    assert supervisor.check(restart=lambda child: False) == []
    assert supervisor.done("worker-dev-0001") and len(spawner.started) == 1


def test_deaths_spread_over_time_are_not_a_crash_loop(tmp_path: Path) -> None:
    clock = FakeClock(start=0.0)
    supervisor, spawner = _supervisor(tmp_path, clock)
    supervisor.start("worker-dev-0002", ["w"])
    for _ in range(6):
        spawner.started[-1][1].code = -9
        assert supervisor.check() == ["worker-dev-0002"]
        clock.advance(31.0)  # at most two deaths within any 60 s


def test_a_crash_loop_gives_up_naming_the_child_status_and_log(tmp_path: Path) -> None:
    clock = FakeClock(start=0.0)
    supervisor, spawner = _supervisor(tmp_path, clock)
    supervisor.start("aggregator", ["lorafleet", "aggregator"])
    for _ in range(2):
        spawner.started[-1][1].code = 1
        supervisor.check()
        clock.advance(5.0)
    spawner.started[-1][1].code = 1
    with pytest.raises(CrashLoop, match=r"aggregator died 3 times within 60 s \(last exit status 1") as info:
        supervisor.check()
    assert "started lorafleet aggregator #2" in str(info.value)  # the log's last lines


def test_stop_all_terminates_what_runs(tmp_path: Path) -> None:
    supervisor, spawner = _supervisor(tmp_path, FakeClock())
    supervisor.start("a", ["a"])
    supervisor.start("b", ["b"])
    spawner.started[1][1].code = 0
    supervisor.stop_all()
    assert spawner.started[0][1].terminated and not spawner.started[1][1].terminated


def test_an_exit_that_a_restart_cannot_mend_gives_up_at_once(tmp_path: Path) -> None:
    supervisor, spawner = _supervisor(tmp_path, FakeClock())
    supervisor.start("orchestrator", ["lorafleet", "orchestrator"])
    spawner.started[0][1].code = 3  # StateLost.exit_code: the run's state vanished
    with pytest.raises(FatalExit, match="orchestrator exited with status 3"):
        supervisor.check()
    assert len(spawner.started) == 1
