"""A device's held-out rows for federated evaluation (``eval.device_fraction``): never trained on.

Each device draws its own held-out rows from its rows (its shard, or its own file) with a seed of its
own, derived from the run's seed and its id, so the draw is the same in every process and every
incarnation of the device, and independent of every other device's.
"""

from __future__ import annotations

import hashlib
import random

from lorafleet.data.datasets import TextDataset


def held_out_count(rows: int, fraction: float) -> int:
    """How many of ``rows`` rows are held out at ``fraction``: the nearest whole number, at least one
    and at least one row left to train on; none when ``fraction`` is 0 or there are fewer than 2 rows."""
    if fraction <= 0.0 or rows < 2:
        return 0
    return min(rows - 1, max(1, round(fraction * rows)))


def held_out_seed(run_seed: int, device_id: str) -> int:
    """The seed of ``device_id``'s draw (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(f"held-out:{run_seed}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def split_held_out(rows: TextDataset, fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """(training rows, held-out rows) of ``rows``: :func:`held_out_count` rows drawn by ``seed``, each
    part in the rows' own order."""
    held = held_out_count(len(rows), fraction)
    drawn = set(random.Random(seed).sample(range(len(rows)), held))
    keep = [i for i in range(len(rows)) if i not in drawn]
    return rows.subset(keep), rows.subset(sorted(drawn))
