"""FlexLoRA-style merge (pure), a baseline beside :mod:`aggregator.merge.rankwise`.

``svd`` (Bai et al., NeurIPS 2024): per block and module the products B_i·A_i are averaged
(sample-weighted, contributors only) and factored back to the global rank by SVD:
B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T. Shared tensors (the head) are the sample-weighted mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aggregator.merge.rankwise import WeightedUpdate, aggregate, check_updates
from lorafleet.ml.lora import Tensors, factor_pairs


def aggregate_svd(global_tensors: Tensors, updates: Sequence[WeightedUpdate]) -> Tensors:
    """FlexLoRA-style: average the products B·A, then factor back to the global rank by SVD."""
    check_updates(global_tensors, updates)
    out = aggregate(global_tensors, updates)
    for (_block, _module), (a_key, b_key) in factor_pairs(global_tensors).items():
        contributors = [u for u in updates if a_key in u.tensors and b_key in u.tensors]
        if not contributors:
            continue
        total = sum(u.weight for u in contributors)
        product = torch.stack(
            [u.weight * (u.tensors[b_key].double() @ u.tensors[a_key].double()) for u in contributors]
        ).sum(dim=0) / total
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
