"""Every merge rule reads a round's updates once, one at a time (aggregator/merge/registry.py): the
aggregator's memory does not grow with the number of updates in a round."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch

from aggregator.merge.rankwise import WeightedUpdate
from aggregator.merge.registry import MERGES
from lorafleet.ml.lora import Tensors
from schemas.strategies import AggregationName
from tests.unit.test_strategies import HEAD_W, key

GLOBAL: Tensors = {
    key(0, "query", "A"): torch.zeros(4, 6),
    key(0, "query", "B"): torch.zeros(6, 4),
    key(1, "query", "A"): torch.zeros(4, 6),
    key(1, "query", "B"): torch.zeros(6, 4),
    HEAD_W: torch.zeros(2, 6),
}


def _update(i: int) -> WeightedUpdate:
    """Device ``i``'s update: rank 2 or 4, block 1 only for every other device."""
    gen = torch.Generator().manual_seed(i)
    rank = 2 if i % 2 else 4
    tensors = {HEAD_W: torch.randn(2, 6, generator=gen)}
    for block in (0, 1) if i % 2 == 0 else (0,):
        tensors[key(block, "query", "A")] = torch.randn(rank, 6, generator=gen)
        tensors[key(block, "query", "B")] = torch.randn(6, rank, generator=gen)
    return WeightedUpdate(tensors, float(1 + i))


@pytest.mark.parametrize("rule", sorted(MERGES, key=str))
def test_a_merge_holds_at_most_two_updates_while_it_reads_them(rule: AggregationName) -> None:
    # Given twelve updates supplied by a generator that makes each one when asked
    alive: list[weakref.ref[WeightedUpdate]] = []
    most_alive = 0

    def supplied() -> Iterator[WeightedUpdate]:
        nonlocal most_alive
        for i in range(12):
            gc.collect()
            most_alive = max(most_alive, sum(ref() is not None for ref in alive))
            update = _update(i)
            alive.append(weakref.ref(update))
            yield update
            del update

    # When the rule merges them
    streamed = MERGES[rule](GLOBAL, supplied())
    # Then no more than the update being folded in and the one before it were alive at once (a rule
    # that lists them all holds all twelve), and the result is the one from a list of them
    assert most_alive <= 2, f"{rule}: {most_alive} updates alive at once"
    listed = MERGES[rule](GLOBAL, [_update(i) for i in range(12)])
    for name, tensor in listed.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=1e-6, atol=1e-7)
