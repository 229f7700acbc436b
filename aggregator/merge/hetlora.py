"""HetLoRA merge (pure), a baseline beside :mod:`aggregator.merge.rankwise`.

``hetlora`` (Cho et al., EMNLP 2024): updates are zero-padded to the global rank and averaged
  over every device that trained the block, each weighted by its sample count times the Frobenius
  norm of its product B·A (sparsity-weighted aggregation). Ranks a device did not train count as
  zeros, which is the dilution rank-wise averaging avoids. Shared tensors (the head) are the
  sample-weighted mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from aggregator.merge.rankwise import WeightedUpdate, aggregate, folding
from lorafleet.ml.lora import Tensors


def _padded(t: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float64)
    out.narrow(axis, 0, t.shape[axis]).copy_(t.to(torch.float64))
    return out


class _Sums:
    """Running sums of one factor pair: norm-weighted, and sample-weighted for when every norm is 0."""

    def __init__(self, a_shape: torch.Size, b_shape: torch.Size) -> None:
        self.a, self.b = torch.zeros(a_shape, dtype=torch.float64), torch.zeros(b_shape, dtype=torch.float64)
        self.plain_a, self.plain_b = torch.zeros_like(self.a), torch.zeros_like(self.b)
        self.total = self.plain_total = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, weight: float) -> None:
        pa, pb = _padded(a, self.a.shape, 0), _padded(b, self.b.shape, 1)
        norm_weight = weight * float(torch.linalg.matrix_norm(b.double() @ a.double()))
        self.a += norm_weight * pa
        self.b += norm_weight * pb
        self.total += norm_weight
        self.plain_a += weight * pa
        self.plain_b += weight * pb
        self.plain_total += weight

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.total > 0:
            return self.a / self.total, self.b / self.total
        return self.plain_a / self.plain_total, self.plain_b / self.plain_total


def aggregate_hetlora(global_tensors: Tensors, updates: Iterable[WeightedUpdate]) -> Tensors:
    """HetLoRA: zero-padding, norm-weighted, over the devices that trained each block.

    ``updates`` is read once, one at a time (running sums per factor pair beside the rank-wise
    merge's, which checks each update and averages the shared tensors): a generator that loads each
    update when asked holds one in memory.
    """
    sums: dict[tuple[str, str], _Sums] = {}

    def fold(a_key: str, b_key: str, update: WeightedUpdate) -> None:
        shapes = global_tensors[a_key].shape, global_tensors[b_key].shape
        pair = sums.setdefault((a_key, b_key), _Sums(*shapes))
        pair.add(update.tensors[a_key], update.tensors[b_key], update.weight)

    # the shared tensors (and any unpaired key) as FedAvg
    out = aggregate(global_tensors, folding(global_tensors, updates, fold))
    for (a_key, b_key), pair in sums.items():
        a, b = pair.mean()
        out[a_key] = a.to(global_tensors[a_key].dtype)
        out[b_key] = b.to(global_tensors[b_key].dtype)
    return out
