"""The Redis ACL users of broker_config/redis-users.acl.template: enough for the state store, no more."""

from __future__ import annotations

import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafleet.state.base import StateStoreError

TEMPLATE = Path(__file__).resolve().parents[2] / "broker_config" / "redis-users.acl.template"


def _rules(user: str) -> list[str]:
    for line in TEMPLATE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        parts = shlex.split(line)
        if parts[:2] == ["user", user]:
            return [p for p in parts[2:] if not p.startswith(">")]
    raise AssertionError(f"{user} not in {TEMPLATE}")


@pytest.fixture
def acl_user(redis_url: str) -> Iterator[tuple[str, str]]:
    """The template's lf-aggregator rules as a throwaway user on the real Redis."""
    name, password = f"lf-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    subprocess.run(
        ["redis-cli", "ACL", "SETUSER", name, "reset", *_rules("lf-aggregator"), f">{password}"],
        check=True,
        capture_output=True,
    )
    try:
        yield name, password
    finally:
        subprocess.run(["redis-cli", "ACL", "DELUSER", name], capture_output=True)


def test_the_service_user_runs_the_state_store_but_nothing_else(
    acl_user: tuple[str, str], run_id: str
) -> None:
    import redis

    from lorafleet.state.redis import RedisStateStore

    name, password = acl_user
    url = f"redis://{name}:{password}@127.0.0.1:6379/0"
    store = RedisStateStore(url, retries=0)
    try:
        # the whole round protocol works (Lua scripts included)
        store.put_run_field(run_id, "status", "running")
        assert store.open_round(run_id, 1, {"t1": "d1"}, {"t1": "{}"}, 1, 10_000, 0)
        result = store.record_update(run_id, 1, "t1", "d1", b"x", 1)
        assert result.outcome == "counted" and result.closed_now
        assert store.mark_aggregated(run_id, 1, 1)
        store.delete_run(run_id)
    finally:
        store.close()
    client = redis.Redis.from_url(url)
    try:
        for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("GET", "not-lorafleet")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
    finally:
        client.close()
    with pytest.raises(StateStoreError):
        bad = RedisStateStore(f"redis://{name}:wrong@127.0.0.1:6379/0", retries=0)
        bad.get_run_fields(run_id)
