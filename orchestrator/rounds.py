"""Round bookkeeping of the orchestrator (pure): who is sampled, what closes a round, task ids."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence


def sample_devices(device_ids: Sequence[str], fraction: float, round_no: int, seed: int) -> list[str]:
    """A seeded sample of ``ceil(fraction * n)`` devices for a round (all of them at 1.0), sorted."""
    ordered = sorted(device_ids)
    if fraction >= 1.0 or not ordered:
        return ordered
    count = max(1, math.ceil(fraction * len(ordered) - 1e-9))  # 0.07 * 100 is 7.000000000000001
    digest = hashlib.sha256(f"{seed}:{round_no}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return sorted(rng.sample(ordered, count))


def quorum_size(num_tasks: int, fraction: float) -> int:
    """How many reports close a round of ``num_tasks`` tasks."""
    if num_tasks < 1:
        raise ValueError("a round needs at least one task")
    return max(1, min(num_tasks, math.ceil(fraction * num_tasks - 1e-9)))


def task_id(run_id: str, round_no: int, device_id: str) -> str:
    """The id of a device's task in a round (deterministic, so re-issuing is idempotent)."""
    return f"{run_id}:{round_no}:{device_id}"
