"""Robust aggregation (pure): bound what a poisoned or broken device can do to the global adapter.

* **norm clipping**: each update's change from the global adapter (over all the tensors it
  carries) is scaled down to at most ``clip_norm`` (L2), before any merging;
* **coordinate-wise trimmed mean / median**, per key over the devices that trained it: at every
  coordinate the ``trim`` fraction of highest and lowest values are dropped before the weighted
  mean (``trimmed_mean``), or the median is taken (``median``). For LoRA factors of different
  ranks the statistic is taken rank-index-wise over the devices whose rank covers the index.

Robust merges are weighted only where the statistic allows: the trimmed mean weights the kept
values by sample count; the median is unweighted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from aggregator.merge.rankwise import WeightedUpdate, check_updates
from lorafleet.ml.lora import Tensors, parse_key


def clip_updates(
    global_tensors: Tensors, updates: Sequence[WeightedUpdate], clip_norm: float
) -> list[WeightedUpdate]:
    """Scale each update's difference from the global adapter to an L2 norm of at most ``clip_norm``."""
    check_clip_norm(clip_norm)
    return [clip_update(global_tensors, update, clip_norm) for update in updates]


def check_clip_norm(clip_norm: float) -> None:
    """Raises ValueError unless ``clip_norm`` is positive and finite."""
    if clip_norm <= 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")


def clip_update(global_tensors: Tensors, update: WeightedUpdate, clip_norm: float) -> WeightedUpdate:
    """One update with its difference from the global adapter scaled to an L2 norm of at most
    ``clip_norm`` (positive and finite: :func:`check_clip_norm`)."""
    deltas = {k: t.double() - _aligned(global_tensors[k], t, k) for k, t in update.tensors.items()}
    norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    tensors = {
        k: (_aligned(global_tensors[k], update.tensors[k], k) + scale * d).to(update.tensors[k].dtype)
        for k, d in deltas.items()
    }
    return WeightedUpdate(tensors, update.weight)


def _aligned(global_tensor: torch.Tensor, like: torch.Tensor, key: str) -> torch.Tensor:
    """The part of the global tensor an update of shape ``like`` covers (its first ranks)."""
    axis = parse_key(key).rank_axis
    g = global_tensor.double()
    if g.shape == like.shape or axis is None:
        return g
    return g.narrow(axis, 0, like.shape[axis])


def aggregate_robust(
    global_tensors: Tensors, updates: Sequence[WeightedUpdate], *, method: str, trim: float = 0.2
) -> Tensors:
    """Coordinate-wise ``trimmed_mean`` or ``median`` per key over its contributors.

    Raises:
        ValueError: unknown method, ``trim`` outside [0, 0.5), or updates that do not fit.
    """
    if method not in ("trimmed_mean", "median"):
        raise ValueError(f"unknown robust method {method!r}: use trimmed_mean or median")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    check_updates(global_tensors, updates)
    return {key: _robust_key(key, g, updates, method, trim) for key, g in global_tensors.items()}


def _robust_key(
    key: str, current: torch.Tensor, updates: Sequence[WeightedUpdate], method: str, trim: float
) -> torch.Tensor:
    axis = parse_key(key).rank_axis
    contributions = [(u.tensors[key].double(), u.weight) for u in updates if key in u.tensors]
    if not contributions:
        return current.clone()
    out = current.double().clone()
    if axis is None:
        _check_shapes(key, current, contributions)
        out = _statistic([t for t, _ in contributions], [w for _, w in contributions], method, trim)
        return out.to(current.dtype)
    for index in range(current.shape[axis]):  # rank-index-wise over the devices whose rank covers it
        covering = [(t.select(axis, index), w) for t, w in contributions if t.shape[axis] > index]
        if covering:
            _check_shapes(key, current.select(axis, index), covering)
            out.select(axis, index).copy_(
                _statistic([t for t, _ in covering], [w for _, w in covering], method, trim)
            )
    return out.to(current.dtype)


def _check_shapes(key: str, reference: torch.Tensor, contributions: list[tuple[torch.Tensor, float]]) -> None:
    for tensor, _ in contributions:
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{key}: update shape {tuple(tensor.shape)} does not fit {tuple(reference.shape)}"
            )


def _statistic(values: list[torch.Tensor], weights: list[float], method: str, trim: float) -> torch.Tensor:
    stacked = torch.stack(values)  # (devices, ...)
    if method == "median":
        return stacked.median(dim=0).values if len(values) % 2 else stacked.quantile(0.5, dim=0)
    n = len(values)
    cut = int(math.floor(trim * n))
    if cut == 0:
        w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * (stacked.dim() - 1)))
        return (stacked * w).sum(0) / w.sum()
    order = stacked.argsort(dim=0)
    kept = order[cut : n - cut]  # indices of the kept devices, per coordinate
    w_all = torch.tensor(weights, dtype=torch.float64)
    kept_values = torch.gather(stacked, 0, kept)
    kept_weights = w_all[kept]
    return (kept_values * kept_weights).sum(0) / kept_weights.sum(0)
