"""Workers that share one host's cores take turns at training: at most ``count`` of them train at once.

Eight worker processes on a two-core host (``lorafleet run --broker``, or devices emulated by hand on
one machine) that all train at once get a quarter of a core each: every step is four times slower,
their caches evict one another, and all eight hold a training working set at the same moment (about
330 MiB each on MiniLM: ``benchmarks/results/distributed_memory.md``). Taking turns, two train on a core
each and six wait holding only their model and data; the round ends no later, since the cores do the
same work, and the working sets are two, not eight. Flower's simulation does the same: as many clients
at a time as the resources given to each allow.

A turn is an exclusive ``flock`` on one of ``count`` files in a directory the workers share. The kernel
drops the lock when its holder exits, however it exits, so a killed worker never keeps a turn.
A worker waiting for a turn polls the files; turns are not handed out in order of arrival (each task is
trained from its own seed, so the order changes no result).

A stopped holder (SIGSTOP, a suspended terminal job, a debugger) keeps its lock but uses no core: its
turn is lent. The holder writes its pid and start time into the turn's file; a worker that finds every
turn taken and one holder stopped (``/proc/PID/stat`` state ``T`` or ``t``, the same start time, so a
reused pid or another pid namespace never matches) trains in its place, holding the turn's second lock
(``turn-N.lent.lock``) so that one worker at a time does. When the holder continues, one more than
``count`` may train until the borrower's task ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.errors import ConfigError

if TYPE_CHECKING:  # a service that takes turns but trains nothing (the aggregator) need not load torch here
    from torch import Tensor

    from schemas.messages import TrainTask
    from worker.trainer import Trainer, TrainOutcome

log = logging.getLogger(__name__)

#: where the workers of one host (one user) keep their turns when not told otherwise
DEFAULT_TURNS_DIR = Path(tempfile.gettempdir()) / f"lorafleet-turns-{os.getuid()}"
#: seconds between two looks at the turns while every one is taken
POLL_S = 0.02


class HostTurns:
    """``count`` turns, one lock file each under ``directory`` (made if missing)."""

    def __init__(self, directory: Path, count: int, *, poll_s: float = POLL_S) -> None:
        if count < 1:
            raise ConfigError(f"turns: at least 1 worker must be able to train at a time, got {count}")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"turns directory {directory}: {exc.strerror}") from None
        self.directory = directory
        self.count = count
        self.poll_s = poll_s

    def path(self, index: int) -> Path:
        return self.directory / f"turn-{index}.lock"

    def lent_path(self, index: int) -> Path:
        """The lock of a worker training in the place of turn ``index``'s stopped holder."""
        return self.directory / f"turn-{index}.lent.lock"

    @contextlib.contextmanager
    def turn(self) -> Iterator[int]:
        """Hold a free turn (waiting for one) until the block ends; yields its index. Threads of one
        process take turns as processes do (each lock is on a descriptor of its own)."""
        fd, index = self._take()
        try:
            yield index
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _take(self) -> tuple[int, int]:
        waited = time.monotonic()
        while True:
            for index in range(self.count):
                fd = _locked(self.path(index))
                if fd is not None:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()} {_start_time(os.getpid())}".encode(), 0)
                    log.debug("took turn %d after %.2f s", index, time.monotonic() - waited)
                    return fd, index
            for index in range(self.count):
                pid = _stopped_holder(self.path(index))
                if pid is None:
                    continue
                fd = _locked(self.lent_path(index))
                if fd is not None:
                    log.warning("turn %d: its holder (pid %d) is stopped; training in its place", index, pid)
                    return fd, index
            time.sleep(self.poll_s)


def _locked(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive lock, or None while another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()


def _start_time(pid: int) -> str:
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else "?"  # stat field 22, in clock ticks


def _stopped_holder(path: Path) -> int | None:
    """The pid of the holder written into the turn's file when that process is stopped, else None."""
    try:
        pid_text, started = path.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    fields = _proc_stat(pid)
    if not fields or len(fields) <= 19 or fields[19] != started or started == "?":
        return None
    return pid if fields[0] in ("T", "t") else None


class TakingTurns:
    """A trainer that trains only in a turn of ``turns``; after each task ``after`` runs (a worker in
    its own process gives the task's freed memory back to the OS there, while it waits for its next)."""

    def __init__(
        self, trainer: Trainer, turns: HostTurns, *, after: Callable[[], object] | None = None
    ) -> None:
        self.trainer = trainer
        self.turns = turns
        self.after = after

    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        try:
            with self.turns.turn():
                return self.trainer.train(task, start)
        finally:
            if self.after is not None:
                self.after()
