"""Evaluation of a global adapter on the held-out split."""

from __future__ import annotations

import torch
from torch import Tensor

from lorafleet.data.datasets import EncodedDataset, iter_batches
from lorafleet.ml.model import AdapterRuntime
from schemas.messages import LoraSpec


@torch.no_grad()
def evaluate(
    runtime: AdapterRuntime,
    spec: LoraSpec,
    tensors: dict[str, Tensor],
    encoded_eval: EncodedDataset,
    batch_size: int = 64,
) -> tuple[float, float]:
    """Return (accuracy, mean per-example cross-entropy) of the adapter ``tensors`` on ``encoded_eval``.

    Raises:
        ValueError: empty evaluation set, or ``tensors`` do not fit ``spec``.
    """
    if len(encoded_eval) == 0:
        raise ValueError("the evaluation set is empty")
    model = runtime.load(spec, tensors)
    model.eval()
    correct, loss_sum = 0, 0.0
    for batch in iter_batches(encoded_eval, batch_size, seed=None):
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    n = len(encoded_eval)
    return correct / n, loss_sum / n
