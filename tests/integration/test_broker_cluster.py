"""Broker failover: a distributed run over a 3-node RabbitMQ cluster survives SIGKILL of the node that
leads the ``lf.updates`` quorum queue, mid-round.

The test starts its own cluster on loopback, three throwaway nodes of the installed RabbitMQ (named
``lf-n1-<random>@localhost`` ..., with their own AMQP and distribution ports, data, logs, plugins file
and Erlang cookie under the test's tmp directory), joins them, declares lorafleet's topology with
quorum queues through the first node (so that node leads every queue), and runs
``lorafleet run CONFIG --broker URL1,URL2,URL3 --state redis://127.0.0.1:6379/0`` on the tiny model.
When round 2 (or a later one) is open and has counted at least one update, it SIGKILLs the node
leading ``lf.updates``, with the services connected to that node or to another one, and checks that

* the run completes every round (``final_round == max_rounds``, ``finish_reason: max_rounds``);
* every update is counted exactly once and none is lost: for every round, the counted updates in Redis
  are exactly its tasks, all with tensors (no device dropped, no empty update), ``update_counted``
  equals their sum, the report counts the same, and every other delivery the aggregator saw ended
  ``duplicate`` or ``late`` (redeliveries); nothing is rejected or dead-lettered and nothing is left
  in ``lf.updates``;
* the services really failed over (their logs say so) and ``lf.updates`` has a new leader.

It never touches the shared broker on port 5672: it starts the nodes with the scripts in
``/usr/lib/rabbitmq/bin`` (Debian's ``/usr/sbin`` wrappers switch to the ``rabbitmq`` user and drop the
environment, which would start the shared node's configuration), reads nothing from /etc/rabbitmq (an
empty env file and its own config), kills only processes whose environment names one of its nodes, and
stops every node it started in a finally block. Redis is the shared one, used under a unique run id
that is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika.exceptions
import pytest
import yaml

from lorafleet.state.redis import RedisStateStore
from lorafleet.transport import rabbitmq as rabbitmq_module
from lorafleet.transport import topology
from lorafleet.transport.base import TransportError
from lorafleet.transport.rabbitmq import PikaTransport, broker_urls
from tests.conftest import REDIS_HOST, REDIS_PORT, _redis_ping
from tests.integration.test_faults import DEVICES, MAX_ROUNDS, _env
from tests.integration.test_faults import run_config as faults_run_config

REPO = Path(__file__).resolve().parents[2]
NODES = 3
KILL_IN_ROUND = 2
VHOST = topology.VHOST
#: the whole test, cluster start and stop included, stays below this (pytest-timeout enforces it)
TEST_TIMEOUT_S = 290
#: the run itself (from `lorafleet run` to its report)
RUN_TIMEOUT_S = 200.0
SHARED_AMQP_PORT = 5672
#: where the RabbitMQ scripts are when not on PATH as themselves (Debian, Ubuntu)
RABBITMQ_BIN_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin", "/opt/rabbitmq/sbin")


def run_config(run_id: str) -> dict[str, Any]:
    """tests/integration/test_faults.py's experiment (6 devices, 4 rounds of the tiny random BERT on
    synthetic data, quorum 1.0 and a long lease: a lost update would stall the run rather than pass
    unnoticed), with half the devices slower (about 1.5 s and 3.75 s per task), so that every round is
    mid-way for a few seconds, long enough to kill a node inside it however loaded the machine is."""
    slow_half = [
        {"name": "fast", "fraction": 0.5, "speed": 0.1},
        {"name": "slow", "fraction": 0.5, "speed": 0.04},
    ]
    overrides = {"devices": {"tiers": slow_half}, "rounds": {"registration_timeout_s": 120.0}}
    return faults_run_config(run_id, overrides)


# -- the cluster ----------------------------------------------------------------------------------------


def _unavailable(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} and CI is set")
    pytest.skip(what)


def _rabbitmq_bin_dir() -> Path | None:
    """The directory of the real rabbitmq-server/rabbitmqctl scripts (not Debian's su wrappers)."""
    candidates = [os.environ.get("LORAFLEET_RABBITMQ_BIN", ""), *RABBITMQ_BIN_DIRS]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(str(Path(found).parent))
    for directory in filter(None, candidates):
        server, ctl = Path(directory) / "rabbitmq-server", Path(directory) / "rabbitmqctl"
        if not (server.is_file() and ctl.is_file()):
            continue
        if "su rabbitmq" in server.read_text(encoding="utf-8", errors="replace"):
            continue  # a wrapper that starts the system's node, whatever the environment says
        return Path(directory)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _environment_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


class Node:
    def __init__(self, cluster: RabbitCluster, index: int) -> None:
        self.index = index
        self.name = f"lf-n{index}-{cluster.tag}@localhost"
        self.amqp_port = _free_port()
        self.dist_port = _free_port()
        assert SHARED_AMQP_PORT not in (self.amqp_port, self.dist_port)
        self.dir = cluster.root / f"n{index}"
        self.dir.mkdir(parents=True)
        self.config = self.dir / "rabbitmq.conf"
        self.config.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            "loopback_users.guest = true\n"
            "heartbeat = 10\n"
            "vm_memory_high_watermark.absolute = 1GB\n"
            "disk_free_limit.absolute = 50MB\n",
            encoding="utf-8",
        )
        self.pid_file = self.dir / "beam.pid"
        self.log = self.dir / "stdout.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/{VHOST}?heartbeat=10"

    def beam_pid(self) -> int | None:
        """The node's Erlang VM, only if its environment names this node (never another broker)."""
        try:
            pid = int(self.pid_file.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None
        return pid if _environment_of(pid).get("RABBITMQ_NODENAME") == self.name else None


class RabbitCluster:
    """Throwaway RabbitMQ nodes on loopback, clustered; everything they write stays under ``root``."""

    def __init__(self, root: Path, bin_dir: Path, size: int = NODES) -> None:
        self.root = root
        self.bin = bin_dir
        self.tag = uuid.uuid4().hex[:6]
        cookie = root / ".erlang.cookie"
        cookie.write_text(f"LORAFLEETTEST{uuid.uuid4().hex.upper()}", encoding="utf-8")
        cookie.chmod(0o400)
        (root / "enabled_plugins").write_text("[].\n", encoding="utf-8")
        (root / "rabbitmq-env.conf").write_text("# empty: /etc/rabbitmq/rabbitmq-env.conf is not read\n")
        self.nodes = [Node(self, i) for i in range(1, size + 1)]

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.root),  # the Erlang cookie of the nodes and of rabbitmqctl
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def _node_env(self, node: Node) -> dict[str, str]:
        env = self._base_env()
        env.update(
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_CONFIG_FILE=str(node.config),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node.dir / "advanced.config"),  # absent
            RABBITMQ_MNESIA_BASE=str(node.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(node.dir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(node.pid_file),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            # one scheduler each (the host has 2 cores), distribution on loopback only
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} +S 1:1",
        )
        return env

    def ctl(self, node: Node, *args: str, timeout: float = 90.0) -> str:
        result = subprocess.run(
            [str(self.bin / "rabbitmqctl"), "-q", "-n", node.name, *args],
            env=self._base_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl -n {node.name} {' '.join(args)}: {result.stderr or result.stdout}"
            )
        return result.stdout

    def start(self) -> None:
        for node in self.nodes:
            with node.log.open("wb") as handle:
                node.proc = subprocess.Popen(
                    [str(self.bin / "rabbitmq-server")],
                    env=self._node_env(node),
                    cwd=node.dir,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        for node in self.nodes:
            # `wait` (unlike await_startup) waits for the node to come up at all: its pid file, then the app
            self.ctl(node, "wait", str(node.pid_file), "--timeout", "90", timeout=120.0)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        self.ctl(first, "await_online_nodes", str(len(self.nodes)), "--timeout", "60", timeout=90.0)
        self.ctl(first, "add_vhost", VHOST)
        self.ctl(first, "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")

    def live(self) -> list[Node]:
        return [node for node in self.nodes if not node.killed]

    def urls(self, nodes: list[Node] | None = None) -> str:
        return ",".join(node.url for node in nodes or self.nodes)

    def leader(self, queue: str) -> Node:
        out = self.ctl(self.live()[0], "list_queues", "-p", VHOST, "name", "leader", "--no-table-headers")
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == queue:
                return next(node for node in self.nodes if node.name == fields[1])
        raise AssertionError(f"no leader for {queue!r} in:\n{out}")

    def kill(self, node: Node) -> None:
        pid = node.beam_pid()
        assert pid is not None, f"no running VM found for {node.name}"
        os.kill(pid, signal.SIGKILL)
        node.killed = True
        deadline = time.monotonic() + 30.0
        while Path(f"/proc/{pid}").exists() and _environment_of(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        """Stop every node this cluster started: SIGKILL its VM (data is throwaway) and its session."""
        for node in self.nodes:
            pid = node.beam_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)  # its own session (start_new_session)
        for node in self.nodes:
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=30)

    def dump_logs(self, tail: int = 60) -> None:
        for node in self.nodes:
            for log in [node.log, *sorted((node.dir / "log").glob("*.log"))]:
                if log.is_file():
                    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
                    print(f"\n===== {node.name}: {log.name} (last {tail} lines) =====")
                    print("\n".join(lines[-tail:]))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RabbitCluster]:
    bin_dir = _rabbitmq_bin_dir()
    if bin_dir is None:
        _unavailable("the RabbitMQ server scripts (rabbitmq-server, rabbitmqctl) are not installed")
    if not _redis_ping():
        _unavailable(f"Redis on {REDIS_HOST}:{REDIS_PORT} is not reachable")
    assert bin_dir is not None
    # short path: the nodes' directories end up in Erlang paths and socket names
    root = tmp_path / "rmq"
    root.mkdir()
    nodes = RabbitCluster(root, bin_dir)
    try:
        nodes.start()
        yield nodes
    except BaseException:
        nodes.dump_logs()
        raise
    finally:
        nodes.close()


# -- the run --------------------------------------------------------------------------------------------


def _logs(out: Path, launcher_log: Path) -> str:
    parts = [launcher_log.read_text(encoding="utf-8", errors="replace")]
    parts += [p.read_text(encoding="utf-8", errors="replace") for p in sorted((out / "logs").glob("*.log"))]
    return "\n".join(parts)


def _wait_mid_round(
    store: RedisStateStore, run_id: str, launcher: subprocess.Popen[bytes]
) -> tuple[int, int]:
    """Until a round from KILL_IN_ROUND on is open with at least one update counted and one still
    missing (a later round if a starved test process missed the moment); returns (round, reported)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    round_no = KILL_IN_ROUND
    while time.monotonic() < deadline:
        assert launcher.poll() is None, (
            f"the run ended (status {launcher.returncode}) before round {round_no}"
        )
        info = store.get_round(run_id, round_no)
        if info is not None:
            if info.status != "open":
                assert round_no < MAX_ROUNDS, "every round closed before the test saw one mid-round"
                round_no += 1
                continue
            if 1 <= info.reported < len(info.tasks):
                return round_no, info.reported
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for round {round_no} to be mid-round")


def check_every_update_counted_once(store: RedisStateStore, run_id: str, report: dict[str, Any]) -> int:
    """For every round: the counted updates are exactly its tasks, all trained, one per device; over the
    run the counter, the report and the rounds agree. Returns how many updates were counted."""
    assert store.list_rounds(run_id) == list(range(1, MAX_ROUNDS + 1))
    counted = 0
    for entry in report["rounds"]:
        r = entry["round"]
        info = store.get_round(run_id, r)
        assert info is not None
        updates = store.get_updates(run_id, r)
        assert len(info.tasks) == DEVICES, f"round {r}: {len(info.tasks)} tasks"
        assert sorted(info.tasks.values()) == sorted(set(info.tasks.values())), f"round {r}: a device twice"
        assert set(updates) == set(info.tasks), (
            f"round {r}: counted {sorted(updates)} of {sorted(info.tasks)}"
        )
        assert all(updates.values()), f"round {r}: an update without tensors (a device was dropped)"
        assert info.reported == len(updates) == entry["tasks_issued"] == entry["devices_reported"]
        assert info.close_reason == "quorum", f"round {r} closed on {info.close_reason}"
        counted += len(updates)
    assert counted == DEVICES * MAX_ROUNDS
    assert store.get_counters(run_id).get("update_counted", 0) == counted
    assert report["updates"].get("counted") == counted, report["updates"]
    assert set(report["updates"]) <= {"counted", "duplicate", "late"}, report["updates"]
    assert report["rejected"] == {}, report["rejected"]
    assert report["tasks_failed"] == 0
    assert report["tasks_dropped"] == 0
    return counted


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize(
    "clients_on_leader",
    [
        pytest.param(True, id="clients-on-the-killed-node"),
        pytest.param(False, id="clients-on-a-surviving-node"),
    ],
)
def test_run_survives_killing_the_updates_leader(
    cluster: RabbitCluster, tmp_path: Path, clients_on_leader: bool
) -> None:
    """``clients-on-the-killed-node``: every service is connected to the node that dies and fails
    over to the next URL (connections lost, unacked deliveries redelivered, unconfirmed publishes
    retried elsewhere). ``clients-on-a-surviving-node``: the services' first URL is another node, so
    their connections survive and only the queue's leader moves (a publishing channel that was
    nacked during the election must be replaced, see PikaTransport._run)."""
    started = time.monotonic()
    run_id = f"t-cluster-{uuid.uuid4().hex[:10]}"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(run_config(run_id), sort_keys=False), encoding="utf-8")
    out = tmp_path / "out"
    # the topology is declared through node 1, which therefore leads every static queue
    first, *others = cluster.nodes
    urls = cluster.urls([first, *others] if clients_on_leader else [*others, first])
    state_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"

    # The topology, with quorum queues, through the first node: it leads every queue.
    admin = PikaTransport(cluster.urls(), max_reconnect_s=30.0)
    try:
        topology.declare_static_topology(admin)
    finally:
        admin.close()
    victim = cluster.leader(topology.UPDATES_QUEUE)
    assert victim is first
    queue_types = cluster.ctl(
        cluster.nodes[0], "list_queues", "-p", VHOST, "name", "type", "--no-table-headers"
    )
    assert re.search(rf"^{re.escape(topology.UPDATES_QUEUE)}\s+quorum$", queue_types, re.M), queue_types

    store = RedisStateStore(state_url)
    launcher_log = tmp_path / "launcher.log"
    launcher: subprocess.Popen[bytes] | None = None
    try:
        with launcher_log.open("wb") as handle:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "lorafleet", "run", str(config_path), "--out", str(out)]
                + ["--broker", urls, "--state", state_url],
                cwd=REPO,
                env=_env(),
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        kill_round, reported = _wait_mid_round(store, run_id, launcher)
        cluster.kill(victim)
        killed_at = time.monotonic() - started
        print(
            f"[{killed_at:6.1f} s] SIGKILL {victim.name} (leader of lf.updates), round {kill_round}: "
            f"{reported}/{DEVICES} updates counted"
        )
        try:
            code = launcher.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not finish within {RUN_TIMEOUT_S:.0f} s of the kill") from None
        assert code == 0, f"lorafleet run exited with status {code}"
        print(f"[{time.monotonic() - started:6.1f} s] run finished")

        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        assert report["final_round"] == MAX_ROUNDS, report["final_round"]
        assert report["finish_reason"] == "max_rounds", report["finish_reason"]
        assert [r["round"] for r in report["rounds"]] == list(range(1, MAX_ROUNDS + 1))
        assert report["final_accuracy"] is not None
        counted = check_every_update_counted_once(store, run_id, report)

        survivors = cluster.live()
        new_leader = cluster.leader(topology.UPDATES_QUEUE)
        assert new_leader is not victim and new_leader in survivors
        transport = PikaTransport(cluster.urls(survivors), max_reconnect_s=20.0)
        try:
            assert transport.queue_depth(topology.UPDATES_QUEUE) == 0
            assert transport.queue_depth(topology.DEAD_LETTER_QUEUE) == 0
        finally:
            transport.close()
        logs = _logs(out, launcher_log)
        failovers = re.findall(
            rf"lost the connection to broker 127\.0\.0\.1:{victim.amqp_port}; failing over", logs
        )
        if clients_on_leader:
            assert failovers, "no service logged a failover to another broker"
        else:
            assert not failovers, "a service lost its connection to the killed node it was not using"
        print(
            f"updates {report['updates']} ({counted} counted, once each); {len(failovers)} failovers logged; "
            f"lf.updates now led by {new_leader.name}; {time.monotonic() - started:.1f} s"
        )
    except BaseException:
        if launcher_log.is_file():
            print(_logs(out, launcher_log)[-20000:])
        raise
    finally:
        if launcher is not None and launcher.poll() is None:
            launcher.terminate()  # the launcher terminates its services, then kills what is left
            try:
                launcher.wait(timeout=45)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait(timeout=30)
        _kill_leftover_services(config_path)
        try:
            store.delete_run(run_id)
        finally:
            store.close()


def _kill_leftover_services(config_path: Path) -> None:
    """SIGKILL any lorafleet service of this test's run still alive (its command line names the
    test's own config file, so nothing else can match)."""
    marker = str(config_path).encode()
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline.split(b"\0") and b"lorafleet" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc_dir.name), signal.SIGKILL)


# -- the failover logic, without a server ------------------------------------------------------------


def test_broker_urls() -> None:
    a, b = "amqp://u:p@h1:5672/v", "amqp://u:p@h2:5673/v?heartbeat=10"
    assert broker_urls(a) == [a]
    assert broker_urls(f"{a},{b}") == [a, b]
    assert broker_urls(f" {a} , {b} ,") == [a, b]
    assert broker_urls([a, b]) == [a, b]
    assert broker_urls([f"{a},{b}"]) == [a, b]
    with pytest.raises(TransportError):
        broker_urls(" , ")
    with pytest.raises(TransportError, match="not amqp"):
        PikaTransport(f"{a},h2:5672")  # every element must be a whole URL
    with pytest.raises(TransportError) as refused:
        PikaTransport("amqp://u:secret@h1/v,http://u:secret@h2/v")
    assert "secret" not in str(refused.value)


class _FakeImpl:
    def __init__(self, params: Any) -> None:
        self.params = params


class _FakeConnection:
    def __init__(self, params: Any) -> None:
        self._impl = _FakeImpl(params)
        self.is_open = True


def test_connections_start_with_the_broker_after_a_lost_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """pika gets every broker, the preferred one first; the one it connected to becomes preferred;
    a lost connection moves the preference to the broker after it (and not twice for one loss)."""
    tried: list[list[int]] = []
    up = {5681: False, 5682: True, 5683: True}

    def connect(params: list[Any]) -> _FakeConnection:
        tried.append([p.port for p in params])
        for p in params:  # pika's workflow: the first that answers
            if up[p.port]:
                return _FakeConnection(p)
        raise pika.exceptions.AMQPConnectionError("all down")

    monkeypatch.setattr(rabbitmq_module, "BlockingConnection", connect)
    urls = ",".join(f"amqp://u:p@127.0.0.1:{port}/v" for port in up)
    transport = PikaTransport(urls)
    connection, index = transport._connect()
    assert (tried[-1], index) == ([5681, 5682, 5683], 1)  # node 1 down: pika went on to node 2
    assert transport._connect()[1] == 1 and tried[-1] == [5682, 5683, 5681]  # the working one first
    transport._connection_lost(1)
    transport._connection_lost(1)  # a second thread reporting the same loss moves nothing
    up[5682] = False
    assert transport._connect()[1] == 2 and tried[-1] == [5683, 5681, 5682]
    transport._connection_lost(0)  # a stale report about another broker changes nothing
    assert transport._connect()[1] == 2 and tried[-1][0] == 5683


def test_one_url_connects_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[list[int]] = []

    def connect(params: list[Any]) -> _FakeConnection:
        tried.append([p.port for p in params])
        return _FakeConnection(params[0])

    monkeypatch.setattr(rabbitmq_module, "BlockingConnection", connect)
    transport = PikaTransport("amqp://u:p@127.0.0.1:5672/v?heartbeat=7", connection_attempts=4)
    assert transport._connect()[1] == 0
    transport._connection_lost(0)
    assert transport._connect()[1] == 0 and tried == [[5672], [5672]]
    assert transport._params.heartbeat == 7 and transport._params.connection_attempts == 4
