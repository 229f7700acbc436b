"""Supervision of the one-command distributed mode: restart what dies, give up only on a crash loop.

Every service is a child process started from its command line. A child that exits 0 is done (a
worker after ``RunFinished``, the orchestrator and aggregator after the report). A child that dies
any other way (an error, a signal) is started again with the same command: a worker re-registers
and takes its device's tasks again (an unacked task goes back to its queue), the orchestrator and
the aggregator resume the run from the state store. A child that dies ``max_crashes`` times within
``window_s`` is a crash loop: the supervisor gives up, naming the child, its exit status and the
last lines of its log.
"""

from __future__ import annotations

import logging
import subprocess
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from lorafleet.run.clock import Clock, SystemClock
from schemas.errors import LorafleetError, StateLost

log = logging.getLogger(__name__)


class CrashLoop(LorafleetError):
    """A child process kept dying: restarting it again would not help."""


class FatalExit(LorafleetError):
    """A child exited with a status that says a restart cannot help (e.g. the run's state was lost)."""


class Process(Protocol):
    pid: int

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


Spawn = Callable[[Sequence[str], IO[bytes]], Process]


def popen(env: dict[str, str] | None = None) -> Spawn:
    """Start children as OS processes (with ``env``, or this process's environment)."""

    def spawn(command: Sequence[str], log_file: IO[bytes]) -> Process:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)

    return spawn


@dataclass(frozen=True)
class RestartPolicy:
    max_crashes: int = 3  # deaths within window_s that make a crash loop
    window_s: float = 120.0
    fatal_codes: frozenset[int] = frozenset({StateLost.exit_code})  # exits not worth a restart


@dataclass
class Child:
    name: str
    command: list[str]
    process: Process
    log_path: Path
    log_file: IO[bytes]
    crashes: deque[float] = field(default_factory=deque)
    restarts: int = 0
    done: bool = False

    def tail(self, lines: int = 5) -> str:
        self.log_file.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])


class Supervisor:
    """The children of one run, restarted on death (see the module docstring)."""

    def __init__(
        self,
        logs: Path,
        *,
        policy: RestartPolicy | None = None,
        clock: Clock | None = None,
        spawn: Spawn | None = None,
    ) -> None:
        self.logs = logs
        self.policy = policy or RestartPolicy()
        self.clock = clock or SystemClock()
        self._spawn = spawn or popen()
        self.children: dict[str, Child] = {}

    def start(self, name: str, command: Sequence[str]) -> Child:
        log_path = self.logs / f"{name}.log"
        log_file = log_path.open("ab")
        child = Child(name, list(command), self._spawn(command, log_file), log_path, log_file)
        self.children[name] = child
        return child

    def check(self, *, restart: Callable[[Child], bool] = lambda child: True) -> list[str]:
        """Reap the children that exited; restart each that died (where ``restart`` allows it).

        Returns the names restarted.

        Raises:
            CrashLoop: a child died ``max_crashes`` times within ``window_s``.
        """
        restarted = []
        for child in self.children.values():
            if child.done:
                continue
            code = child.process.poll()
            if code is None:
                continue
            if code == 0:
                child.done = True
                continue
            if code in self.policy.fatal_codes:
                raise FatalExit(
                    f"{child.name} exited with status {code}, which a restart cannot mend; "
                    f"the end of {child.log_path}:\n{child.tail()}"
                )
            if not restart(child):
                child.done = True
                log.warning("supervisor: %s exited with status %s; not restarted", child.name, code)
                continue
            self._count_crash(child, code)
            log.warning("supervisor: %s exited with status %s; restarting it", child.name, code)
            child.process = self._spawn(child.command, child.log_file)
            child.restarts += 1
            restarted.append(child.name)
        return restarted

    def _count_crash(self, child: Child, code: int) -> None:
        now = self.clock.now()
        child.crashes.append(now)
        while child.crashes and child.crashes[0] < now - self.policy.window_s:
            child.crashes.popleft()
        if len(child.crashes) >= self.policy.max_crashes:
            raise CrashLoop(
                f"{child.name} died {len(child.crashes)} times within {self.policy.window_s:.0f} s "
                f"(last exit status {code}); the end of {child.log_path}:\n{child.tail()}"
            )

    def alive(self, name: str) -> bool:
        child = self.children[name]
        return not child.done and child.process.poll() is None

    def done(self, name: str) -> bool:
        return self.children[name].done

    def stop_all(self, grace_s: float = 30.0) -> None:
        """Terminate every child still running (SIGTERM, then SIGKILL after ``grace_s``)."""
        running = [c for c in self.children.values() if c.process.poll() is None]
        for child in running:
            child.process.terminate()
        for child in running:
            try:
                child.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(timeout=grace_s)
        for child in self.children.values():
            child.log_file.close()
