"""Evaluation batches hold rows of similar length (a batch is padded to its longest row)."""

from __future__ import annotations

import random

from lorafleet.data.datasets import EncodedDataset
from lorafleet.ml.scoring import CAUSAL_BATCH, eval_batches


def _rows(lengths: list[int], causal: bool = False) -> EncodedDataset:
    ids = [[1] * n for n in lengths]
    return EncodedDataset(ids, [0] * len(ids), 0, response_starts=[0] * len(ids) if causal else None)


def _padded(encoded: EncodedDataset, batches: list[list[int]]) -> int:
    return sum(len(b) * max(len(encoded.input_ids[i]) for i in b) for b in batches)


def test_every_row_once_in_batches_of_rising_length_with_less_padding_than_row_order() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(300)]
    encoded = _rows(lengths)
    batches = eval_batches(encoded, 64)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert [len(b) for b in batches] == [64, 64, 64, 64, 44]
    for before, after in zip(batches, batches[1:], strict=False):
        assert max(lengths[i] for i in before) <= min(lengths[i] for i in after)
    in_order = [list(range(s, min(s + 64, 300))) for s in range(0, 300, 64)]
    assert _padded(encoded, batches) < 0.75 * _padded(encoded, in_order)
    assert _padded(encoded, batches) <= 1.25 * sum(lengths)


def test_rows_of_equal_length_keep_their_order_and_a_causal_lm_gets_small_batches() -> None:
    encoded = _rows([5] * 20, causal=True)
    batches = eval_batches(encoded, 64)
    assert [i for b in batches for i in b] == list(range(20))
    assert max(len(b) for b in batches) == CAUSAL_BATCH
