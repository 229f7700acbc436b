"""Redis does not grow with every round's updates: an aggregated round keeps receipts, not tensors.

Fifty rounds of three devices on the real RabbitMQ and Redis, with update tensors of about 70 KB
each (fake trainers on a wide fake adapter): without compaction the run's keys would hold every
round's 200 KB of updates (10 MB by the end, and compose's Redis has ``maxmemory 1gb noeviction``).
"""

from __future__ import annotations

from typing import cast

import pytest
import redis

from lorafleet.state import keys
from lorafleet.state.redis import RedisStateStore
from lorafleet.transport.rabbitmq import PikaTransport
from tests.pipeline import helpers
from tests.pipeline.helpers import build_pipeline, make_config

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

ROUNDS = 50
DEVICES = 3


def _memory(client: redis.Redis, key: str) -> int:
    return int(cast(int | None, client.memory_usage(key, samples=0)) or 0)


@pytest.mark.timeout(300)
def test_fifty_rounds_keep_the_state_store_flat(
    rabbitmq_url: str, redis_url: str, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helpers, "HIDDEN", 1024)  # every update: 2 blocks x 2 modules x rank 4 x 2 x 1024
    state = RedisStateStore(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        config = make_config(run_id, devices=DEVICES, rounds=ROUNDS)
        pipeline = build_pipeline(
            config,
            [PikaTransport(rabbitmq_url) for _ in range(2 + DEVICES)],
            state,
            deltas=[0.01, 0.02, 0.03],
            samples=[10, 20, 30],
        )
        pipeline.run_threaded(timeout=240)
        per_round = [_memory(client, keys.round_updates(run_id, r)) for r in range(1, ROUNDS + 1)]
        whole_run = sum(_memory(client, k.decode()) for k in client.scan_iter(match=keys.run_pattern(run_id)))
        print(f"updates per aggregated round: max {max(per_round)} B; every key of the run: {whole_run} B")
        # every round was aggregated, and what it keeps of its three ~70 KB updates is receipts
        assert all(state.get_round(run_id, r).status == "aggregated" for r in range(1, ROUNDS + 1))  # type: ignore[union-attr]
        assert max(per_round) < 1_000, per_round
        stored = state.get_updates(run_id, ROUNDS)
        assert len(stored) == DEVICES and all(body.startswith(b"lf-receipt:") for body in stored.values())
        # ... so the whole run (round bookkeeping, metrics, the one global adapter) stays far below
        # one round's updates per round (50 x 200 KB = 10 MB without compaction)
        assert whole_run < 2_000_000, whole_run
    finally:
        state.delete_run(run_id)
        state.close()
        client.close()
