"""Evaluation of a global adapter on the held-out split.

Sequence classification: accuracy and the mean per-example cross-entropy. Causal LM: the mean
cross-entropy per response token (perplexity is its exp) and exact-match accuracy, the share of rows
whose every response token is the model's most likely next token given the prompt and the response
so far (what greedy decoding would reproduce, end-of-sequence marker included; meaningful where the
responses are short answers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.functional import cross_entropy

from lorafleet.data.datasets import IGNORE_INDEX, EncodedDataset, iter_batches
from lorafleet.ml.model import AdapterRuntime, forward_inputs
from schemas.config import perplexity
from schemas.messages import LoraSpec

#: Rows per evaluation batch of a causal LM (its logits are rows x tokens x vocabulary).
CAUSAL_BATCH = 8


class Evaluation(NamedTuple):
    """What an evaluation measured; unpacks as ``(accuracy, loss)``."""

    accuracy: float
    loss: float

    @property
    def perplexity(self) -> float:
        """exp(loss): for a causal LM, the perplexity of the response tokens."""
        return perplexity(self.loss)


@torch.no_grad()
def evaluate(
    runtime: AdapterRuntime,
    spec: LoraSpec,
    tensors: dict[str, Tensor],
    encoded_eval: EncodedDataset,
    batch_size: int = 64,
) -> Evaluation:
    """Evaluate the adapter ``tensors`` on ``encoded_eval`` (see the module docstring).

    Raises:
        ValueError: empty evaluation set, or ``tensors`` do not fit ``spec``.
    """
    if len(encoded_eval) == 0:
        raise ValueError("the evaluation set is empty")
    model = runtime.load(spec, tensors)
    model.eval()
    if encoded_eval.causal:
        return _evaluate_causal(model, encoded_eval, min(batch_size, CAUSAL_BATCH))
    correct, loss_sum = 0, 0.0
    for batch in iter_batches(encoded_eval, batch_size, seed=None):
        labels = batch.pop("labels")
        logits = model(**forward_inputs(batch)).logits.float()
        loss_sum += float(cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    n = len(encoded_eval)
    return Evaluation(correct / n, loss_sum / n)


def _evaluate_causal(model: torch.nn.Module, encoded: EncodedDataset, batch_size: int) -> Evaluation:
    exact, loss_sum, tokens = 0, 0.0, 0
    for batch in iter_batches(encoded, batch_size, seed=None):
        labels = batch.pop("labels")[:, 1:]  # token t is predicted at position t - 1
        logits = model(**batch).logits[:, :-1].float()
        scored = labels != IGNORE_INDEX
        losses = cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        loss_sum += float(losses[scored].sum())
        tokens += int(scored.sum())
        right = (logits.argmax(dim=-1) == labels) | ~scored
        exact += int(right.all(dim=1).sum())
    return Evaluation(exact / len(encoded), loss_sum / max(tokens, 1))
