"""A replicated state store on loopback: a Redis primary, a replica and three Sentinels (issue 18).

The services reach Redis through a ``redis+sentinel://`` URL. Mid-run, right after a round closed,
the primary is SIGKILLed; the Sentinels promote the replica and the clients follow it (their calls
ride out the gap). Asynchronous replication may have lost the primary's last writes: the services
detect that (the fenced ``round`` and ``aggregated`` fields behind what they wrote) and redo what was
lost from the aggregator's snapshot, so every round is aggregated exactly once in the store and every
update is accounted once. The old primary then comes back as a replica of the new one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.sentinel import MasterNotFoundError

from lorafleet.state.redis import RedisStateStore, _DiscoveringConnection, _QuorumSentinel
from tests.integration.test_faults import (
    MAX_ROUNDS,
    TEST_TIMEOUT_S,
    check_accounting,
    check_completed,
    check_task_queues_empty,
    device_ids,
    fleet_of,
    run_config,
)

pytestmark = [pytest.mark.redis, pytest.mark.rabbitmq, pytest.mark.slow]

SERVICE = "lfstate"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class SentinelCluster:
    """A primary, a replica and three Sentinels of this test, each in its own directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_ports = [_free_port(), _free_port()]
        self.sentinel_ports = [_free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start_data(self, port: int, replica_of: int | None) -> None:
        directory = self.root / f"redis-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
        cmd += ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            cmd += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.procs[port] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(port)

    def start(self) -> None:
        primary, replica = self.data_ports
        self.start_data(primary, None)
        self.start_data(replica, primary)
        for port in self.sentinel_ports:
            conf = self.root / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.root}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n",
                encoding="utf-8",
            )
            cmd = ["redis-server", str(conf), "--sentinel"]
            self.procs[port] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_port(port)
        self.wait_until(lambda: self.replica_online(primary), "the replica to be in sync")
        self.wait_until(lambda: self.known_replicas() >= 1 and self.primary() == primary, "the Sentinels")

    @staticmethod
    def replica_online(primary: int) -> bool:
        with redis.Redis(port=primary, socket_timeout=2, decode_responses=True) as client:
            info = client.info("replication")
        return any(isinstance(v, dict) and v.get("state") == "online" for v in info.values())

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[0], socket_timeout=2, decode_responses=True)

    def primary(self) -> int | None:
        with self.sentinel() as s:
            address = s.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        return None if not address else int(address[1])

    def known_replicas(self) -> int:
        with self.sentinel() as s:
            replicas = s.execute_command("SENTINEL", "replicas", SERVICE)
        return sum(1 for r in replicas if "s_down" not in str(r))

    @staticmethod
    def wait_until(predicate: object, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():  # type: ignore[operator]
                    return
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def sentinel_cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")
    cluster = SentinelCluster(tmp_path / "redis")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_the_state_store_follows_the_sentinels_to_the_new_primary(sentinel_cluster: SentinelCluster) -> None:
    # Given a store on the Sentinel URL, with every script waiting for the replica
    store = RedisStateStore(sentinel_cluster.url + "?wait_replicas=1&wait_timeout_ms=2000", outage_s=60)
    try:
        store.put_run_field("r", "epoch", "e1")
        assert store.open_round("r", 1, {"t": "d"}, {"t": "{}"}, 1, 10_000, 1_000)
        # When the primary dies and the Sentinels promote the replica
        old = sentinel_cluster.primary()
        assert old is not None
        sentinel_cluster.kill(old)
        # Then the next call waits for the failover and lands on the new primary, where the writes
        # acknowledged by the replica before the primary died are (WAIT 1)
        assert store.record_update("r", 1, "t", "d", b"u", 2_000).outcome == "counted"
        assert sentinel_cluster.primary() not in (None, old)
        assert store.get_run_fields("r") == {"epoch": "e1"}
        assert store.get_updates("r", 1) == {"t": b"u"}
    finally:
        store.close()


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_run_over_sentinel_survives_a_failover_mid_run(
    sentinel_cluster: SentinelCluster, rabbitmq_url: str, run_id: str, tmp_path: Path
) -> None:
    with fleet_of(tmp_path / "run", run_config(run_id), rabbitmq_url, sentinel_cluster.url) as fleet:
        fleet.start_run(workers=device_ids())
        # When the primary is SIGKILLed right after round 2 closed (its last writes may not have
        # reached the replica) and the Sentinels promote the replica
        fleet.wait_closed(2)
        old = sentinel_cluster.primary()
        assert old is not None
        sentinel_cluster.kill(old)
        fleet.mark("primary killed")
        sentinel_cluster.wait_until(lambda: sentinel_cluster.primary() not in (None, old), "the failover")
        fleet.mark(f"failover: primary {old} -> {sentinel_cluster.primary()}")
        # ... and the old primary comes back, as a replica of the new one (what Sentinel's rewrite of
        # its configuration does; started as an empty primary instead, it can win the Sentinels back
        # and take the data with it, measured here: README "Replicated state store")
        sentinel_cluster.start_data(old, sentinel_cluster.primary())
        # Then the run completes, every round aggregated exactly once in the store, every update
        # accounted once
        report = fleet.wait_services_done()
        fleet.wait_workers_done()
        check_completed(report)
        accounting = check_accounting(fleet, report, lost_with_state=True)
        assert accounting.empty == 0
        for r in range(1, MAX_ROUNDS + 1):
            info = fleet.store.get_round(run_id, r)
            assert info is not None and info.status == "aggregated" and info.global_version == r
        # a round close the failover lost is redone once: at most two aggregations of any round (and
        # every one of them before the loss or after it, which the log order shows)
        closed = Counter(
            int(m.group(1)) for m in fleet.log_lines("aggregator", r"aggregator: round (\d+) closed")
        )
        assert set(closed) == set(range(1, MAX_ROUNDS + 1)) and max(closed.values()) <= 2, closed
        redone = sorted(r for r, n in closed.items() if n == 2)
        check_task_queues_empty(fleet)
        print(
            f"sentinel failover: updates {report['updates']}, rounds redone {redone}, "
            f"restores {report['state_restored']}, final accuracy {report['final_accuracy']}"
        )


class _StaleSentinel:
    """A Sentinel's answer to SENTINEL MASTERS: ``port`` as the primary at ``epoch``."""

    def __init__(self, port: int, epoch: int) -> None:
        self.state = {
            "ip": "127.0.0.1",
            "port": port,
            "config-epoch": epoch,
            "role-reported": "master",  # its view of the role, up to an INFO period old
            "is_master": True,
            "is_sdown": False,
            "is_odown": False,
            "num-other-sentinels": 2,
        }

    def sentinel_masters(self) -> dict[str, dict[str, object]]:
        return {SERVICE: self.state}


def test_the_primary_is_the_candidate_that_itself_says_it_is_one(tmp_path: Path) -> None:
    # Given a primary and its replica, and Sentinels of which the ones at the newer epoch still name the
    # replica as the primary (their view of its role not yet refreshed: the demoted primary of a
    # failover that came back as a replica)
    cluster = SentinelCluster(tmp_path / "redis")
    primary, replica = cluster.data_ports
    try:
        cluster.start_data(primary, None)
        cluster.start_data(replica, primary)
        sentinel = _QuorumSentinel([("127.0.0.1", cluster.sentinel_ports[0])])
        stale, behind = _StaleSentinel(replica, 7), _StaleSentinel(primary, 6)
        sentinel.sentinels = [stale, stale, behind]
        # When a client asks for the primary, then it gets the instance that answers ROLE as the
        # primary (before: the replica, newest epoch and most votes, which refuses every write)
        assert sentinel.discover_master(SERVICE) == ("127.0.0.1", primary)
        # ... and with no instance confirming, none (the pool then retries, as for a primary down)
        sentinel.sentinels = [stale]
        with pytest.raises(MasterNotFoundError):
            sentinel.discover_master(SERVICE)
    finally:
        cluster.stop()


class _MovedPrimary:
    """A Sentinel pool whose Sentinels now name the Redis on 127.0.0.1:6379."""

    is_master = True
    check_connection = False

    def __init__(self) -> None:
        self.asked = 0

    def get_master_address(self) -> tuple[str, int]:
        self.asked += 1
        return ("127.0.0.1", 6379)


def test_a_dropped_connection_asks_the_sentinels_again_before_it_reconnects() -> None:
    # Given a connection that last talked to a primary gone since (a port nothing listens on now) ...
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        gone = probe.getsockname()[1]
    pool = _MovedPrimary()
    connection = _DiscoveringConnection(connection_pool=pool, host="127.0.0.1", port=gone, socket_timeout=2)
    # When a command is sent on it (redis-py reconnects there through connect_check_health, not
    # connect(): before, to the old address, for the whole outage window)
    connection.send_command("PING")
    # Then it went to the primary the Sentinels name now
    assert connection.read_response() in (b"PONG", "PONG")
    assert (connection.port, pool.asked) == (6379, 1)
    connection.disconnect()
