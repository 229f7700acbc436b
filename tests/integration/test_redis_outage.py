"""The Redis adapter rides out a Redis restart (the same command sent again), and gives up in time.

Each test runs its own redis-server on a free loopback port and stops it: the shared Redis on 6379
is never touched.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafleet.state.base import StateStoreError
from lorafleet.state.redis import RedisStateStore

pytestmark = [pytest.mark.redis]


class PrivateRedis:
    """A redis-server of this test: started, stopped (SHUTDOWN NOSAVE), started again on one port."""

    def __init__(self, root: Path, *, appendonly: bool) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.root = root
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.root)]
        aof = "yes" if self.appendonly else "no"
        command += ["--save", "", "--appendonly", aof, "--appendfsync", "always"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True)
            self.proc.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")
    server = PrivateRedis(tmp_path, appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_call_rides_out_a_redis_restart(private_redis: PrivateRedis) -> None:
    store = RedisStateStore(private_redis.url, outage_s=30)
    try:
        store.put_run_field("r", "round", 3)
        # When Redis goes away for 2 s (append-only: it comes back with its data) ...
        private_redis.stop()
        restart = threading.Timer(2.0, private_redis.start)
        restart.start()
        started = time.monotonic()
        # Then a call made meanwhile waits for it and succeeds, and nothing was lost
        store.incr_counter("r", "c", 1)
        waited = time.monotonic() - started
        restart.join()
        assert 1.5 <= waited < 30, waited
        assert store.get_run_fields("r") == {"round": 3}
        assert store.get_counters("r") == {"c": 1}
    finally:
        store.close()


def test_a_call_fails_clearly_once_the_outage_outlasts_its_bound(private_redis: PrivateRedis) -> None:
    store = RedisStateStore(private_redis.url, outage_s=3)
    try:
        private_redis.stop()
        started = time.monotonic()
        with pytest.raises(StateStoreError, match="ConnectionError"):
            store.get_run_fields("r")
        assert 3 <= time.monotonic() - started < 10
    finally:
        store.close()
