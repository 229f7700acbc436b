"""HetLoRA merge (pure), a baseline beside :mod:`aggregator.merge.rankwise`.

``hetlora`` (Cho et al., EMNLP 2024): updates are zero-padded to the global rank and averaged
  over every device that trained the block, each weighted by its sample count times the Frobenius
  norm of its product B·A (sparsity-weighted aggregation). Ranks a device did not train count as
  zeros, which is the dilution rank-wise averaging avoids. Shared tensors (the head) are the
  sample-weighted mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aggregator.merge.rankwise import WeightedUpdate, aggregate, check_updates
from lorafleet.ml.lora import Tensors, factor_pairs


def _padded(t: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float64)
    out.narrow(axis, 0, t.shape[axis]).copy_(t.to(torch.float64))
    return out


def aggregate_hetlora(global_tensors: Tensors, updates: Sequence[WeightedUpdate]) -> Tensors:
    """HetLoRA: zero-padding, norm-weighted, over the devices that trained each block."""
    check_updates(global_tensors, updates)
    out = aggregate(global_tensors, updates)  # shared tensors (and any unpaired key) as FedAvg
    for (_block, _module), (a_key, b_key) in factor_pairs(global_tensors).items():
        contributors = [u for u in updates if a_key in u.tensors and b_key in u.tensors]
        if not contributors:
            continue
        weights = [
            u.weight * float(torch.linalg.matrix_norm(u.tensors[b_key].double() @ u.tensors[a_key].double()))
            for u in contributors
        ]
        total = sum(weights)
        if total <= 0:
            weights, total = [u.weight for u in contributors], sum(u.weight for u in contributors)
        a_shape, b_shape = global_tensors[a_key].shape, global_tensors[b_key].shape
        pairs = list(zip(weights, contributors, strict=True))
        a = torch.stack([w * _padded(u.tensors[a_key], a_shape, 0) for w, u in pairs]).sum(dim=0)
        b = torch.stack([w * _padded(u.tensors[b_key], b_shape, 1) for w, u in pairs]).sum(dim=0)
        out[a_key] = (a / total).to(global_tensors[a_key].dtype)
        out[b_key] = (b / total).to(global_tensors[b_key].dtype)
    return out
