"""Services forked from one warm interpreter: the libraries' memory paid once per host, not per process.

Every service of ``lorafleet run --broker`` imports torch, transformers, peft and datasets. Measured on
this host, an interpreter holds about 280 MiB of *private* memory after those imports (relocated
library data, Python objects), and ten such processes paid it ten times. A zygote imports them once:
multiprocessing's forkserver, started with :data:`PRELOAD` imported, forks each service from that warm
state, and the pages the service never writes stay shared copy-on-write (PSS divides them among the
processes); :mod:`lorafleet.app.zygote_preload` is what it imports.

A forked service runs exactly the command line it would have run as ``python -m lorafleet ...``
(:func:`lorafleet.app.cli.main` with that argv), with the environment the launcher gives it and its
output in its log; it exits with the same status. Any other command starts as an OS process.
Fork semantics keep every service's state its own: what a service writes is copied for it alone.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import IO

from lorafleet.app.supervisor import Process, Spawn, popen

#: what the zygote imports before it forks anything: every module a service needs at start
PRELOAD = ("lorafleet.app.zygote_preload",)

#: the command prefix of a lorafleet service (:func:`lorafleet.app.launcher.service_command` starts with it)
SERVICE_PREFIX = (sys.executable, "-m", "lorafleet")


class ForkedService:
    """A service forked from the zygote, behind the supervisor's :class:`Process` interface
    (``poll`` and ``wait`` return ``-N`` for a death by signal N, as :class:`subprocess.Popen` does)."""

    def __init__(self, process: multiprocessing.process.BaseProcess, command: Sequence[str]) -> None:
        self._process = process
        self._command = list(command)
        if process.pid is None:
            raise RuntimeError(f"the zygote did not start {' '.join(command)}")
        self.pid: int = process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(self._command, timeout or 0.0)
        return code


def serve(argv: list[str], log_path: str, env: dict[str, str]) -> None:
    """The forked service: the launcher's environment, output to its log, then the CLI with ``argv``."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.argv = ["lorafleet", *argv]
    retitle([*SERVICE_PREFIX, *argv])
    from lorafleet.app.cli import main

    main()


def retitle(argv: Sequence[str]) -> bool:
    """Show ``argv`` as this process's command line (``/proc/PID/cmdline``: ps, top, pgrep -f) in place
    of the forkserver's, as an OS process started with it would; False where it cannot.

    Written over the kernel's argument area (``arg_start``..``arg_end``, fields 48-49 of
    ``/proc/self/stat``), NUL-separated and cut to fit (the forkserver's own command line is long: it
    holds ``sys.path``). setproctitle, the library for this, finds that area by walking back from
    ``environ``, which fails in a forkserver child (measured: "couldn't find argv from environ").
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # proc(5) fields 48, 49; this list starts at 3
    except (OSError, IndexError, ValueError):
        return False
    size = end - start
    if size <= 1:
        return False
    title = b"\0".join(arg.encode() for arg in argv)[: size - 1]
    ctypes.memmove(start, title.ljust(size, b"\0"), size)
    return True


def zygote(env: dict[str, str] | None = None) -> Spawn:
    """Spawn lorafleet services by forking them from a warm zygote (see the module docstring); other
    commands start as OS processes. The zygote starts on the first service."""
    service_env = dict(os.environ if env is None else env)
    context: ForkServerContext = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    fallback = popen(env)

    def spawn(command: Sequence[str], log_file: IO[bytes]) -> Process:
        if tuple(command[: len(SERVICE_PREFIX)]) != SERVICE_PREFIX:
            return fallback(command, log_file)
        log_file.flush()
        argv = list(command[len(SERVICE_PREFIX) :])
        process = context.Process(target=serve, args=(argv, log_file.name, service_env), daemon=False)
        process.start()
        return ForkedService(process, command)

    return spawn
