"""The Redis ACL users of broker_config/redis-users.acl.template: each service gets the keys and
commands of its part of the state store, and nothing else.

Each test creates the template's users as throwaway ACL users on the real Redis (``ACL SETUSER``, random
names and passwords, deleted afterwards); the compose test renders the template with
broker_config/redis-start.sh, as the compose redis service does, and starts a private redis-server on it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from aggregator.hierarchical_service import aggregator_class
from lorafleet.app.embedded import drive
from lorafleet.app.status import run_status
from lorafleet.run.epoch import EPOCH_FIELD
from lorafleet.run.recovery import latest_snapshot, restore
from lorafleet.run.report import build_report
from lorafleet.state.base import StateStore, StateStoreError
from lorafleet.state.redis import RedisStateStore
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from orchestrator.hierarchical_service import orchestrator_class
from schemas.config import RunConfig
from schemas.errors import StateLost
from tests.pipeline.helpers import NUM_BLOCKS, MeanEvaluator, initial_adapter, make_config, make_worker

pytestmark = pytest.mark.redis

BROKER_CONFIG = Path(__file__).resolve().parents[2] / "broker_config"
TEMPLATE = BROKER_CONFIG / "redis-users.acl.template"
START_SCRIPT = BROKER_CONFIG / "redis-start.sh"
SERVICES = ("lf-orchestrator", "lf-aggregator")


def _rules(user: str) -> list[str]:
    """The template's rules for ``user``, without its password."""
    for line in TEMPLATE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        parts = shlex.split(line)
        if parts[:2] == ["user", user]:
            return [p for p in parts[2:] if not p.startswith(">")]
    raise AssertionError(f"{user} not in {TEMPLATE}")


@pytest.fixture
def users(redis_url: str) -> Iterator[dict[str, str]]:
    """Service user of the template -> redis:// URL of a throwaway user with its rules."""
    urls = {}
    created = []
    try:
        for service in SERVICES:
            name, password = f"lf-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
            subprocess.run(
                ["redis-cli", "ACL", "SETUSER", name, "reset", *_rules(service), f">{password}"],
                check=True,
                capture_output=True,
            )
            created.append(name)
            urls[service] = f"redis://{name}:{password}@127.0.0.1:6379/0"
        yield urls
    finally:
        for name in created:
            subprocess.run(["redis-cli", "ACL", "DELUSER", name], capture_output=True)


@pytest.fixture
def cleanup(redis_url: str, run_id: str) -> Iterator[str]:
    """The run id, with every key of that run deleted afterwards (by the default user)."""
    yield run_id
    admin = RedisStateStore(redis_url, outage_s=0)
    admin.delete_run(run_id)
    admin.close()


def _refused(call: Any, *args: Any) -> bool:
    try:
        call(*args)
    except StateStoreError as exc:
        return "NOPERM" in str(exc) or "NoPermission" in str(exc)
    return False


# --------------------------------------------------------------------------- the services work


def _run(
    config: RunConfig,
    orchestrator_state: StateStore,
    aggregator_state: StateStore,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """A whole fake-trainer run, in process, with the orchestrator and the aggregator on their own
    state-store users (the aggregator snapshotting the run into ``out_dir``); returns the report."""
    broker = InMemoryBroker()
    count = config.devices.count
    deltas, samples = [0.1 * (i + 1) for i in range(count)], [10 * (i + 1) for i in range(count)]
    orchestrator = orchestrator_class(config)(
        InMemoryTransport(broker),
        orchestrator_state,
        config=config,
        num_blocks=NUM_BLOCKS,
        initial_adapter=initial_adapter,
    )
    aggregator = aggregator_class(config)(
        InMemoryTransport(broker), aggregator_state, config=config, evaluator=MeanEvaluator(), out_dir=out_dir
    )
    workers = [
        make_worker(config, i, InMemoryTransport(broker), deltas=deltas, samples=samples)
        for i in range(count)
    ]
    for service in (orchestrator, aggregator, *workers):
        service.start()
    drive([orchestrator, aggregator, *workers], until=orchestrator, max_idle_s=30)
    drive([aggregator], until=aggregator, max_idle_s=30)
    return build_report(config, orchestrator_state)


@pytest.mark.parametrize("strategy", ["fedlora", "hierfedlora"])
def test_each_service_runs_its_part_of_the_state_store(
    users: dict[str, str], cleanup: str, strategy: str, redis_url: str, tmp_path: Path
) -> None:
    extra: dict[str, Any] = {"strategy": strategy}
    if strategy == "hierfedlora":
        extra["hier"] = {"groups": 2, "max_frequency": 2}
    config = make_config(cleanup, devices=4, rounds=2, extra=extra)
    orchestrator = RedisStateStore(users["lf-orchestrator"], outage_s=0)
    aggregator = RedisStateStore(users["lf-aggregator"], outage_s=0)
    try:
        report = _run(config, orchestrator, aggregator, tmp_path)  # snapshots on, as in compose
        # the aggregator rewrites report.json too, and `lorafleet status` works as either user
        assert build_report(config, aggregator) == report
        for store in (orchestrator, aggregator):
            assert run_status(store, cleanup)["devices_registered"] == 4
    finally:
        orchestrator.close()
        aggregator.close()
    assert report["final_round"] == 2 and report["finish_reason"] == "max_rounds"
    assert report["rounds"][-1]["devices_reported"] == 4
    # the aggregator's user snapshotted the run after every round (DUMP of the keys its round indexes
    # list, no SCAN), and that listing holds every key the run has
    snapshot = latest_snapshot(tmp_path, cleanup)
    assert snapshot is not None and snapshot.round_no == 2
    admin = RedisStateStore(redis_url, outage_s=0)
    try:
        listed = {name for name, _, _ in json.loads(admin.export_run(cleanup))["keys"]}
        assert listed == {name.decode() for name in admin._run_keys(cleanup)}
        # and the finished run expires after state.retention_s: each service set the keys it may write
        retention_ms = config.state.retention_s * 1000
        ttls = {name: admin._r.pttl(name) for name in sorted(listed)}
        assert all(retention_ms - 600_000 < ttl <= retention_ms for ttl in ttls.values()), ttls
    finally:
        admin.close()


def test_a_lost_run_is_restored_by_an_operator_not_by_a_service_user(
    users: dict[str, str], cleanup: str, redis_url: str, tmp_path: Path
) -> None:
    # Given a run the aggregator's user snapshotted, which the store then lost
    config = make_config(cleanup, devices=2, rounds=1)
    orchestrator = RedisStateStore(users["lf-orchestrator"], outage_s=0)
    aggregator = RedisStateStore(users["lf-aggregator"], outage_s=0)
    admin = RedisStateStore(redis_url, outage_s=0)
    try:
        _run(config, orchestrator, aggregator, tmp_path)
        epoch = admin.get_run_fields(cleanup)[EPOCH_FIELD]
        snapshot = latest_snapshot(tmp_path, cleanup)
        assert snapshot is not None
        admin.delete_run(cleanup)
        # When the aggregator's user tries to put it back, the store refuses, and the error says how
        with pytest.raises(StateLost, match=f"lorafleet restore {cleanup} --out {tmp_path}"):
            restore(aggregator, snapshot, tmp_path)
        assert admin.get_run_fields(cleanup) == {}
        # Then `lorafleet restore`, as a user that may write every key, puts the run back
        done = _restore_command(cleanup, tmp_path, redis_url)
        assert done.returncode == 0, done.stderr
        assert f"{cleanup}: restored from its snapshot after round 1" in done.stdout
        fields = admin.get_run_fields(cleanup)
        assert fields[EPOCH_FIELD] == epoch and fields["status"] == "running"  # as after round 1
        assert admin.get_counters(cleanup)["state_restored"] == 1
        # ... and, the run back in the store and going on, a second restore refuses to roll it back
        admin.put_run_field(cleanup, "status", "finished")
        again = _restore_command(cleanup, tmp_path, redis_url)
        assert again.returncode == 1
        assert f"run {cleanup!r} is still in the state store" in again.stderr and "--force" in again.stderr
        assert admin.get_run_fields(cleanup)["status"] == "finished"
        assert admin.get_counters(cleanup)["state_restored"] == 1
    finally:
        for store in (orchestrator, aggregator, admin):
            store.close()


def _restore_command(run_id: str, out: Path, url: str) -> subprocess.CompletedProcess[str]:
    """``lorafleet restore RUN_ID --out OUT --state URL`` as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "lorafleet", "restore", run_id, "--out", str(out), "--state", url],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --------------------------------------------------------------------------- and no more


def _open_a_round(url: str, run_id: str) -> None:
    store = RedisStateStore(url, outage_s=0)
    try:
        store.put_run_field(run_id, "status", "running")
        store.register_device(run_id, "dev-0000", {"num_samples": 1})
        assert store.open_round(
            run_id, 1, {"t1": "dev-0000", "t2": "dev-0001"}, {"t1": "{}", "t2": "{}"}, 2, 10**13, 0
        )
        assert store.open_global_round(run_id, 1, {0: 1})
    finally:
        store.close()


def test_the_orchestrator_cannot_see_or_count_updates(users: dict[str, str], cleanup: str) -> None:
    run_id = cleanup
    _open_a_round(users["lf-orchestrator"], run_id)
    aggregator = RedisStateStore(users["lf-aggregator"], outage_s=0)
    assert aggregator.record_update(run_id, 1, "t1", "dev-0000", b"private update", 1).outcome == "counted"
    aggregator.close()
    store = RedisStateStore(users["lf-orchestrator"], outage_s=0)
    try:
        attacks = {
            "read a device's update": lambda: store.get_updates(run_id, 1),
            "count an update": lambda: store.record_update(run_id, 1, "t2", "dev-0001", b"forged", 2),
            "close rounds": lambda: store.close_expired_rounds(run_id, 10**14),
            "mark a round aggregated": lambda: store.mark_aggregated(run_id, 1, 1),
            "read the aggregation outbox": lambda: store.pending_aggregations(run_id),
            "write a group adapter": lambda: store.put_group_adapter(run_id, 0, 1, b"x"),
            "mark a global round aggregated": lambda: store.mark_global_aggregated(run_id, 1),
        }
        assert [what for what, attack in attacks.items() if not _refused(attack)] == []
        # Residual (the template's comment): a global round's state hash is one key, which the orchestrator
        # writes (targets) and so could count a group aggregation in; Redis cannot tell hash fields apart.
    finally:
        store.close()


def test_the_aggregator_cannot_register_devices_or_change_the_plan(
    users: dict[str, str], cleanup: str
) -> None:
    run_id = cleanup
    _open_a_round(users["lf-orchestrator"], run_id)
    store = RedisStateStore(users["lf-aggregator"], outage_s=0)
    try:
        attacks = {
            "register a device": lambda: store.register_device(run_id, "dev-0009", {"num_samples": 1}),
            "keep a device alive": lambda: store.touch_device(run_id, "dev-0001", 10**14),
            "change the run's status": lambda: store.put_run_field(run_id, "status", "finished"),
            "open a round (tasks and specs)": lambda: store.open_round(
                run_id, 2, {"t": "d"}, {"t": "{}"}, 1, 1, 0
            ),
            "open a global round": lambda: store.open_global_round(run_id, 2, {0: 1}),
        }
        assert [what for what, attack in attacks.items() if not _refused(attack)] == []
        assert store.get_round(run_id, 1) is not None  # what it needs it reads
    finally:
        store.close()


def test_a_wrong_password_is_refused(users: dict[str, str], run_id: str) -> None:
    name = users["lf-aggregator"].split("//", 1)[1].split(":", 1)[0]
    with pytest.raises(StateStoreError):
        bad = RedisStateStore(f"redis://{name}:wrong@127.0.0.1:6379/0", outage_s=0)
        bad.get_run_fields(run_id)


# --------------------------------------------------------------------------- compose's redis service
#
# A redis-server of the test's own, started as compose starts it. The commands that would harm a shared
# server if a regression let them through (FLUSHALL, SCRIPT FLUSH, FUNCTION ...) are tried there only.

PASSWORDS = {
    "LF_REDIS_ORCHESTRATOR_PASSWORD": uuid.uuid4().hex,
    "LF_REDIS_AGGREGATOR_PASSWORD": uuid.uuid4().hex,
    "LF_REDIS_ADMIN_PASSWORD": uuid.uuid4().hex,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(aclfile: Path, passwords: dict[str, str]) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("LF_REDIS_")},
        **passwords,
        "LF_REDIS_ACL_TEMPLATE": str(TEMPLATE),
        "LF_REDIS_ACL_FILE": str(aclfile),
    }


def _render(aclfile: Path, passwords: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(START_SCRIPT), "true"],
        env=_environment(aclfile, passwords),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of a redis-server started through redis-start.sh with ``--aclfile`` on what it renders."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed and CI is set")
        pytest.skip("redis-server is not installed")
    workdir = tmp_path_factory.mktemp("redis")
    aclfile, port = workdir / "run" / "users.acl", _free_port()
    server = subprocess.Popen(
        ["/bin/sh", str(START_SCRIPT), "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(workdir), "--aclfile", str(aclfile)],
        env=_environment(aclfile, PASSWORDS),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


def _url(port: int, service: str) -> str:
    password = PASSWORDS[f"LF_REDIS_{service.removeprefix('lf-').upper()}_PASSWORD"]
    return f"redis://{service}:{password}@127.0.0.1:{port}/0"


def test_compose_renders_the_acl_file(tmp_path: Path) -> None:
    aclfile = tmp_path / "run" / "users.acl"
    # A missing, empty or spaced password stops the container, naming it; nothing is rendered.
    for broken in ({"LF_REDIS_AGGREGATOR_PASSWORD": ""}, {"LF_REDIS_AGGREGATOR_PASSWORD": "two words"}):
        failed = _render(aclfile, {**PASSWORDS, **broken})
        assert failed.returncode != 0 and "LF_REDIS_AGGREGATOR_PASSWORD" in failed.stderr, failed
        assert not aclfile.exists()
    missing = _render(aclfile, {k: v for k, v in PASSWORDS.items() if k != "LF_REDIS_ADMIN_PASSWORD"})
    assert missing.returncode != 0 and "LF_REDIS_ADMIN_PASSWORD" in missing.stderr, missing
    rendered = _render(aclfile, PASSWORDS)
    assert rendered.returncode == 0, rendered.stderr
    assert oct(aclfile.stat().st_mode & 0o777) == "0o600"
    text = aclfile.read_text()
    assert "${" not in text and "#" not in text and all(p in text for p in PASSWORDS.values())


def test_redis_started_like_compose_has_the_users_and_no_default(private_redis: int, run_id: str) -> None:
    anonymous = redis.Redis(port=private_redis, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()  # the default user is off
    anonymous.close()
    store = RedisStateStore(_url(private_redis, "lf-orchestrator"), outage_s=0)
    store.put_run_field(run_id, "status", "running")
    assert store.get_run_fields(run_id) == {"status": "running"}
    store.close()
    store = RedisStateStore(_url(private_redis, "lf-aggregator"), outage_s=0)
    assert _refused(store.put_run_field, run_id, "status", "finished")
    assert store.get_run_fields(run_id) == {"status": "running"}
    store.close()
    admin = redis.Redis(
        port=private_redis, username="lf-admin", password=PASSWORDS["LF_REDIS_ADMIN_PASSWORD"]
    )
    assert admin.ping() and admin.dbsize() >= 1
    admin.close()


def test_no_service_user_administers_enumerates_or_scripts(private_redis: int, run_id: str) -> None:
    store = RedisStateStore(_url(private_redis, "lf-orchestrator"), outage_s=0)
    store.put_run_field(run_id, "status", "running")
    store.close()
    meta = f"lf:{{{run_id}}}:meta"
    commands: list[tuple[Any, ...]] = [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("RANDOMKEY",),
        ("ACL", "LIST"),
        ("CLIENT", "LIST"),
        ("CLIENT", "KILL", "TYPE", "normal"),
        ("EVAL", "return redis.call('FLUSHALL')", "0"),
        ("EVAL", "return 1", "0"),
        ("SCRIPT", "FLUSH"),
        ("FUNCTION", "FLUSH"),
        ("FUNCTION", "LOAD", "#!lua name=lfevil\nredis.register_function('f', function() return 1 end)"),
        ("PUBLISH", "lf", "x"),
        ("GET", "not-lorafleet"),
        ("SET", "not-lorafleet", "x"),
        ("HGETALL", "not-lorafleet"),
        ("DEL", meta),
        ("UNLINK", meta),
        ("RENAME", meta, f"lf:{{{run_id}}}:x"),
        ("EXPIRE", meta, "1"),
        ("PEXPIRE", "not-lorafleet", "1000"),
        ("HSET", f"lf:{{{run_id}}}:unknown", "a", "b"),
    ]
    for service in SERVICES:
        client = redis.Redis.from_url(_url(private_redis, service))
        try:
            allowed: list[tuple[Any, ...]] = []
            for command in commands:
                try:
                    client.execute_command(*command)
                    allowed.append(command[:2])
                except redis.exceptions.NoPermissionError:
                    pass
                except redis.exceptions.ResponseError as exc:  # it ran (a script), then failed
                    allowed.append((*command[:2], str(exc)[:60]))
            assert allowed == [], f"{service} may run {allowed}"
        finally:
            client.close()
