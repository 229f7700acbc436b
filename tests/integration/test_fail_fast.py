"""Fail fast, clearly: a broker or Redis that cannot be reached ends every command within the
start-up bound (LORAFLEET_CONNECT_TIMEOUT, 15 s by default) in at most three lines, none a traceback
or pika's logging, naming the URL with its password masked, with a non-zero exit status.

Each command runs as its own process, three at a time, against a closed port (a free port nobody
listens on) for the server under test and the real server for the other.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis]

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "tiny.yaml")
BOUND_S = 20.0  # the default 15 s of trying plus the interpreter's start, with a margin


def _closed_port() -> int:
    """A port nobody listens on (bound, then released: the kernel does not hand it out again soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _commands(broker: str, state: str, *, down: str) -> dict[str, list[str]]:
    """Every command that talks to the server that is ``down`` (broker or state)."""
    both = {
        "run": ["run", TINY, "--out", "OUT", "--broker", broker, "--state", state],
        "orchestrator": ["orchestrator", TINY, "--out", "OUT", "--broker", broker, "--state", state],
        "aggregator": ["aggregator", TINY, "--out", "OUT", "--broker", broker, "--state", state],
    }
    if down == "broker":
        return both | {
            "worker": ["worker", TINY, "--broker", broker, "--device-id", "dev-0000"],
            "dlq": ["dlq", "--broker", broker],
        }
    return both | {"status": ["status", "--state", state, "--run", "tiny"]}


def _timed(args: list[str], out: Path) -> tuple[float, int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "LORAFLEET_CONNECT_TIMEOUT"}
    command = [sys.executable, "-m", "lorafleet", *[str(out) if a == "OUT" else a for a in args]]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return time.monotonic() - started, done.returncode, lines


@pytest.mark.timeout(240)
@pytest.mark.parametrize("down", ["broker", "state"])
def test_every_command_fails_fast_in_few_lines(
    down: str, rabbitmq_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Given the server under test on a closed port, with a password in its URL
    port = _closed_port()
    broker = f"amqp://guest:s3cret@127.0.0.1:{port}/%2F" if down == "broker" else rabbitmq_url
    state = f"redis://:s3cret@127.0.0.1:{port}/0" if down == "state" else redis_url
    commands = _commands(broker, state, down=down)
    # When every command that needs it starts, three at a time (on 2 shared cores more at once would
    # measure the interpreters' start-up under contention, not the bound)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_timed, args, tmp_path / name) for name, args in commands.items()}
    results = {name: future.result() for name, future in futures.items()}
    for name, (seconds, code, lines) in results.items():
        print(f"{down} down: {name:<12} {seconds:5.1f} s  exit {code}  {len(lines)} line(s)")
    # Then each ended in under 20 s, non-zero, in at most 3 lines naming the masked URL and the cause
    masked = f"127.0.0.1:{port}"
    for name, (seconds, code, lines) in results.items():
        assert seconds < BOUND_S, (name, seconds, lines)
        assert code != 0, (name, lines)
        assert 1 <= len(lines) <= 3, (name, lines)
        text = "\n".join(lines)
        assert "s3cret" not in text and ":***@" + masked in text, (name, text)
        assert "refused" in text.lower() and "Traceback" not in text, (name, text)
