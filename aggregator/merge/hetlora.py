"""Baseline merge rules for heterogeneous-rank LoRA (pure), beside :mod:`aggregator.merge.rankwise`.

* ``hetlora`` (Cho et al., EMNLP 2024): updates are zero-padded to the global rank and averaged
  over every device that trained the block, each weighted by its sample count times the Frobenius
  norm of its product B·A (sparsity-weighted aggregation). Ranks a device did not train count as
  zeros, which is the dilution rank-wise averaging avoids.
* ``svd`` (FlexLoRA-style, Bai et al., NeurIPS 2024): per block and module the products B_i·A_i
  are averaged (sample-weighted, contributors only) and factored back to the global rank by SVD:
  B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T.

Shared tensors (the head) are the sample-weighted mean in both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from aggregator.merge.rankwise import WeightedUpdate, aggregate, check_updates
from lorafleet.ml.lora import Tensors, parse_key

Merge = Callable[[Tensors, Sequence[WeightedUpdate]], Tensors]


def _pairs(tensors: Tensors) -> dict[tuple[int, str], tuple[str, str]]:
    """(block, module) -> (A key, B key)."""
    found: dict[tuple[int, str], dict[str, str]] = defaultdict(dict)
    for key in tensors:
        info = parse_key(key)
        if info.block is not None and info.module is not None and info.factor is not None:
            found[(info.block, info.module)][info.factor] = key
    return {bm: (keys["A"], keys["B"]) for bm, keys in found.items() if "A" in keys and "B" in keys}


def _padded(t: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float64)
    out.narrow(axis, 0, t.shape[axis]).copy_(t.to(torch.float64))
    return out


def aggregate_hetlora(global_tensors: Tensors, updates: Sequence[WeightedUpdate]) -> Tensors:
    """HetLoRA: zero-padding, norm-weighted, over the devices that trained each block."""
    check_updates(global_tensors, updates)
    out = aggregate(global_tensors, updates)  # shared tensors (and any unpaired key) as FedAvg
    for (_block, _module), (a_key, b_key) in _pairs(global_tensors).items():
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
        a = sum(w * _padded(u.tensors[a_key], a_shape, 0) for w, u in zip(weights, contributors, strict=True))
        b = sum(w * _padded(u.tensors[b_key], b_shape, 1) for w, u in zip(weights, contributors, strict=True))
        out[a_key] = (a / total).to(global_tensors[a_key].dtype)  # type: ignore[operator]
        out[b_key] = (b / total).to(global_tensors[b_key].dtype)  # type: ignore[operator]
    return out


def aggregate_svd(global_tensors: Tensors, updates: Sequence[WeightedUpdate]) -> Tensors:
    """FlexLoRA-style: average the products B·A, then factor back to the global rank by SVD."""
    check_updates(global_tensors, updates)
    out = aggregate(global_tensors, updates)
    for (_block, _module), (a_key, b_key) in _pairs(global_tensors).items():
        contributors = [u for u in updates if a_key in u.tensors and b_key in u.tensors]
        if not contributors:
            continue
        total = sum(u.weight for u in contributors)
        product = sum(
            u.weight * (u.tensors[b_key].double() @ u.tensors[a_key].double()) for u in contributors
        )
        product = product / total  # type: ignore[operator]
        rank = global_tensors[a_key].shape[0]
        u_mat, s, vh = torch.linalg.svd(product, full_matrices=False)
        root = torch.sqrt(s[:rank])
        b_new = torch.zeros(global_tensors[b_key].shape, dtype=torch.float64)
        a_new = torch.zeros(global_tensors[a_key].shape, dtype=torch.float64)
        k = root.shape[0]
        b_new[:, :k] = u_mat[:, :k] * root
        a_new[:k, :] = root[:, None] * vh[:k, :]
        out[a_key] = a_new.to(global_tensors[a_key].dtype)
        out[b_key] = b_new.to(global_tensors[b_key].dtype)
    return out


MERGES: dict[str, Merge] = {"rank_wise": aggregate, "hetlora": aggregate_hetlora, "svd": aggregate_svd}
