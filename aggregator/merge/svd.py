"""FlexLoRA-style merge (pure), a baseline beside :mod:`aggregator.merge.rankwise`.

``svd`` (Bai et al., NeurIPS 2024): per block and module the products B_i·A_i are averaged
(sample-weighted, contributors only) and factored back to the global rank by SVD:
B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T. Shared tensors (the head) are the sample-weighted mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from aggregator.merge.rankwise import WeightedUpdate, aggregate, folding
from lorafleet.ml.lora import Tensors


def aggregate_svd(global_tensors: Tensors, updates: Iterable[WeightedUpdate]) -> Tensors:
    """FlexLoRA-style: average the products B·A, then factor back to the global rank by SVD.

    ``updates`` is read once, one at a time: a running sum of the weighted products per block and
    module (one dense matrix each, whatever the number of updates) beside the rank-wise merge's sums.
    """
    products: dict[tuple[str, str], tuple[torch.Tensor, list[float]]] = {}

    def fold(a_key: str, b_key: str, update: WeightedUpdate) -> None:
        product = update.tensors[b_key].double() @ update.tensors[a_key].double()
        acc, total = products.setdefault((a_key, b_key), (torch.zeros_like(product), [0.0]))
        acc += update.weight * product
        total[0] += update.weight

    out = aggregate(global_tensors, folding(global_tensors, updates, fold))
    for (a_key, b_key), (acc, total) in products.items():
        product = acc / total[0]
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
