"""Heterogeneous LoRA aggregation: per key, only over the devices that trained it, rank-aware.

For every key of the global adapter:

* devices whose update lacks the key (they did not train that block) do not dilute it;
* LoRA factors are averaged rank-index-wise: row ``j`` of A (column ``j`` of B) is the
  weighted mean over the devices whose rank exceeds ``j``; rank indices nobody trained keep
  the global value (HetLoRA/FedRA-style contributor-only averaging);
* shared tensors (the head) are the weighted mean over every update.

With identical ranks and every block trained by every device this is plain FedAvg
(sample-weighted mean of each tensor), the FedLoRA/FedIT baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.ml.lora import Tensors, parse_key


@dataclass(frozen=True)
class WeightedUpdate:
    """One device's trained tensors and its weight (its sample count)."""

    tensors: Tensors
    weight: float


def aggregate(global_tensors: Tensors, updates: Sequence[WeightedUpdate]) -> Tensors:
    """The new global adapter; keys and shapes are those of ``global_tensors``.

    Raises:
        ValueError: an update carries a key the global adapter lacks, a shape that does not fit
            it (a shared tensor of another shape, or a rank above the global rank), or a
            non-positive or non-finite weight.
    """
    check_updates(global_tensors, updates)
    return {key: _aggregate_key(key, g, updates) for key, g in global_tensors.items()}


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


def _aggregate_key(key: str, current: torch.Tensor, updates: Sequence[WeightedUpdate]) -> torch.Tensor:
    axis = parse_key(key).rank_axis
    contributions = [(u.tensors[key], u.weight) for u in updates if key in u.tensors]
    if not contributions:
        return current.clone()
    acc = torch.zeros(current.shape, dtype=torch.float64)
    weight = torch.zeros(current.shape, dtype=torch.float64)
    for tensor, w in contributions:
        padded, mask = _pad_to(key, tensor, current.shape, axis)
        acc += w * padded
        weight += w * mask
    averaged = acc / weight.clamp_min(1e-300)
    return torch.where(weight > 0, averaged, current.to(torch.float64)).to(current.dtype)


def _pad_to(
    key: str, tensor: torch.Tensor, shape: torch.Size, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``tensor`` along the rank axis to ``shape``; the mask marks what it covered."""
    t = tensor.to(torch.float64)
    if t.shape == shape:
        return t, torch.ones(shape, dtype=torch.float64)
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
    mask = torch.zeros(shape, dtype=torch.float64)
    padded.narrow(axis, 0, t.shape[axis]).copy_(t)
    mask.narrow(axis, 0, t.shape[axis]).fill_(1.0)
    return padded, mask
