"""Services forked from the zygote (lorafleet/app/zygote.py) behave as the OS processes they replace:
the CLI with their argv, their output in their log, their exit status, their environment, their
command line in /proc, SIGTERM and SIGKILL; and they share the zygote's imports instead of paying for
them again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lorafleet.app.zygote import SERVICE_PREFIX, retitle, zygote
from lorafleet.security.signing import FLEET_KEY_ENV

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "tiny.yaml")


def _cmdline(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [part.decode() for part in raw.split(b"\0") if part]


def _wait_for(predicate: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def _arg_area_bytes() -> int:
    """The size of this process's argument area (what a forked child can retitle within)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[46]) - int(fields[45])


def _retitled(argv: list[str]) -> list[str]:
    """The /proc command line of a forked child after ``retitle(argv)``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: retitle, tell the parent, wait to be read
        os.close(read)
        ok = retitle(argv)
        os.write(write, b"1" if ok else b"0")
        time.sleep(30)
        os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
        return _cmdline(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)


def test_retitle_shows_the_command_line_in_proc_cut_to_the_argument_area() -> None:
    size = _arg_area_bytes()  # the child inherits this process's area: pytest's own command line
    assert size > len("lf\0w\0d7")
    fits = ["lf", "w", "d7"]
    assert _retitled(fits) == fits
    long = ["python", "-m", "lorafleet", "worker", "x" * size]  # longer than the area: cut, not overrun
    assert "\0".join(_retitled(long)).encode() == "\0".join(long).encode()[: size - 1]


def test_a_forked_service_runs_its_command_and_exits_with_its_status(tmp_path: Path) -> None:
    spawn = zygote({**os.environ, "LORAFLEET_ZYGOTE_TEST": "1"})
    with (tmp_path / "good.log").open("ab") as log:
        good = spawn([*SERVICE_PREFIX, "validate", TINY], log)
        assert good.wait(120) == 0
    assert "model:" in (tmp_path / "good.log").read_text()  # validate's own output, in the service's log
    with (tmp_path / "bad.log").open("ab") as log:
        bad = spawn([*SERVICE_PREFIX, "validate", str(tmp_path / "missing.yaml")], log)
        assert bad.wait(120) == 2
    assert "missing.yaml' does not exist" in (tmp_path / "bad.log").read_text()
    with (tmp_path / "other.log").open("ab") as log:  # not a lorafleet service: an OS process
        other = spawn([sys.executable, "-c", "import sys; sys.exit(3)"], log)
        assert other.wait(60) == 3


def test_a_forked_worker_shows_its_command_line_shares_the_zygote_and_stops_on_signals(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    spawn = zygote({**os.environ, FLEET_KEY_ENV: "ab" * 32})
    command = [*SERVICE_PREFIX, "worker", TINY, "--broker", rabbitmq_url, "--device-id", "dev-0001"]
    command += ["--log-level", "INFO"]  # its first lines say it is up (no orchestrator: it waits)
    up = "waiting for the orchestrator's topology"
    with (tmp_path / "worker.log").open("ab") as log:
        worker = spawn(command, log)
        try:
            _wait_for(lambda: up in (tmp_path / "worker.log").read_text())
            assert worker.poll() is None
            assert _cmdline(worker.pid) == command  # what ps, pgrep -f and the fault tests see
            with pytest.raises(subprocess.TimeoutExpired):
                worker.wait(0.5)
            # it did not import torch again: most of its memory is the zygote's pages, shared
            info = psutil.Process(worker.pid).memory_full_info()
            assert info.uss < 0.5 * info.rss, f"USS {info.uss >> 20} MiB of RSS {info.rss >> 20} MiB"
            worker.terminate()
            assert worker.wait(60) == 0  # SIGTERM: the worker's own clean stop
        finally:
            if worker.poll() is None:
                worker.kill()
    with (tmp_path / "killed.log").open("ab") as log:
        victim = spawn(command, log)
        _wait_for(lambda: up in (tmp_path / "killed.log").read_text())
        victim.kill()
        assert victim.wait(60) == -signal.SIGKILL  # as subprocess.Popen reports a death by signal
