"""The state store under contract: the in-process twin and the real Redis adapter, one fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lorafleet.state.base import StateStore
from lorafleet.state.memory import InMemoryStateStore

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, run_id: str) -> Iterator[StateStore]:
    """Each backend, fresh; the Redis one deletes the test's run afterwards."""
    if request.param == "memory":
        memory = InMemoryStateStore()
        yield memory
        memory.close()
        return
    from lorafleet.state.redis import RedisStateStore

    redis_store = RedisStateStore(request.getfixturevalue("redis_url"))
    try:
        yield redis_store
    finally:
        redis_store.delete_run(run_id)
        redis_store.close()
