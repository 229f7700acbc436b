"""Heterogeneous LoRA aggregation: per key, only over the devices that trained it, rank-aware.

For every key of the global adapter:

* devices whose update lacks the key (they did not train that block) do not dilute it;
* LoRA factors are averaged rank-index-wise: row ``j`` of A (column ``j`` of B) is the
  weighted mean over the devices whose rank exceeds ``j``; rank indices nobody trained keep
  the global value (HetLoRA/FedRA-style contributor-only averaging);
* shared tensors (the head) are the weighted mean over every update.

With identical ranks and every block trained by every device this is plain FedAvg
(sample-weighted mean of each tensor), the FedLoRA/FedIT baseline.

``coverage`` (``aggregation_coverage``) damps what part of the round trained: a rank index whose
trainers hold a share ``s`` of the updates' weight moves ``s ** coverage`` of the way from the global
value to their mean. 0 keeps contributor-only averaging; 1 is FedAvg in which a device that did not
train a block sent it back unchanged. A block trained by one device (or one group) alone otherwise
follows that device's data round after round (measured: benchmarks/results/coverage.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lorafleet.ml.lora import Tensors, factor_pairs, parse_key


@dataclass(frozen=True)
class WeightedUpdate:
    """One device's trained tensors and its weight (its sample count)."""

    tensors: Tensors
    weight: float


def aggregate(global_tensors: Tensors, updates: Iterable[WeightedUpdate], coverage: float = 0.0) -> Tensors:
    """The new global adapter; keys and shapes are those of ``global_tensors``.

    ``updates`` is read once, one update at a time: what is kept between them is a float64 running
    sum per key and the sum of weights per rank index, so a generator that loads each update when
    asked holds one update in memory, not all of them. The sums run in the order of ``updates``, so
    the result does not depend on how they are supplied.

    Raises:
        ValueError: an update carries a key the global adapter lacks, a shape that does not fit
            it (a shared tensor of another shape, or a rank above the global rank), or a
            non-positive or non-finite weight.
    """
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    total = 0.0
    for update in updates:
        check_updates(global_tensors, [update])
        total += update.weight
        for key, tensor in update.tensors.items():
            _accumulate(sums, key, global_tensors[key].shape, tensor, update.weight)
    merged = {}
    for key, current in global_tensors.items():
        if key not in sums:
            merged[key] = current.clone()
            continue
        acc, weight = sums.pop(key)  # freed key by key as the merged adapter grows
        averaged = acc / weight.clamp_min(1e-300)
        before = current.to(torch.float64)
        if coverage:
            averaged = before + (weight / total) ** coverage * (averaged - before)
        merged[key] = torch.where(weight > 0, averaged, before).to(current.dtype)
    return merged


def folding(
    global_tensors: Tensors,
    updates: Iterable[WeightedUpdate],
    fold: Callable[[str, str, WeightedUpdate], None],
) -> Iterator[WeightedUpdate]:
    """``updates`` passed through to :func:`aggregate` (which checks each), each then handed to
    ``fold(a_key, b_key, update)`` for every factor pair of the global adapter it trained: how a merge
    keeps its own running sums beside the rank-wise one, reading the updates once."""
    pairs = factor_pairs(global_tensors)
    for update in updates:
        yield update
        for a_key, b_key in pairs.values():
            if a_key in update.tensors and b_key in update.tensors:
                fold(a_key, b_key, update)


def check_updates(global_tensors: Tensors, updates: Sequence[WeightedUpdate]) -> None:
    """Every weight positive and finite, every key known to the global adapter.

    Raises:
        ValueError: naming the first offence.
    """
    for update in updates:
        if not (update.weight > 0 and math.isfinite(update.weight)):  # NaN/inf would poison every mean
            raise ValueError(f"update weight must be positive and finite, got {update.weight}")
        unknown = sorted(set(update.tensors) - set(global_tensors))
        if unknown:
            raise ValueError(f"update carries keys the global adapter lacks: {unknown[:3]}")


def _accumulate(
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]],
    key: str,
    shape: torch.Size,
    tensor: torch.Tensor,
    w: float,
) -> None:
    """Add ``w`` times the update's tensor (zero-padded along the rank axis) to the key's running sum,
    and ``w`` to the weight of every rank index it covers. The weight is kept per rank index,
    broadcastable to ``shape`` (a tensor of ones for a shared tensor): the same numbers as a full mask
    of weights, without a second adapter-sized float64 tensor."""
    axis = parse_key(key).rank_axis
    padded, mask = _pad_to(key, tensor, shape, axis)
    if key not in sums:
        weight_shape = [1] * len(shape)
        if axis is not None:
            weight_shape[axis] = shape[axis]
        sums[key] = (torch.zeros(shape, dtype=torch.float64), torch.zeros(weight_shape, dtype=torch.float64))
    acc, weight = sums[key]
    acc += w * padded
    weight += w * mask


def _pad_to(
    key: str, tensor: torch.Tensor, shape: torch.Size, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``tensor`` along the rank axis to ``shape``; the mask (1 where it covers, 0 where
    padded) varies along the rank axis only and is returned broadcastable to ``shape``."""
    t = tensor.to(torch.float64)
    ones = [1] * len(shape)
    if axis is not None:
        ones[axis] = shape[axis]
    if t.shape == shape:
        return t, torch.ones(ones, dtype=torch.float64)
    ok = (
        axis is not None
        and t.dim() == len(shape)
        and all(t.shape[d] == shape[d] for d in range(t.dim()) if d != axis)
        and t.shape[axis] <= shape[axis]
    )
    if not ok:
        raise ValueError(f"{key}: update shape {tuple(t.shape)} does not fit global shape {tuple(shape)}")
    assert axis is not None
    padded = torch.zeros(shape, dtype=torch.float64)
    mask = torch.zeros(ones, dtype=torch.float64)
    padded.narrow(axis, 0, t.shape[axis]).copy_(t)
    mask.narrow(axis, 0, t.shape[axis]).fill_(1.0)
    return padded, mask
