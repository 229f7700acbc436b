"""Evaluation of a global adapter on the held-out split (the aggregator's central evaluation set).

Sequence classification: accuracy and the mean per-example cross-entropy. Causal LM: the mean
cross-entropy per response token (perplexity is its exp) and exact-match accuracy (see
:mod:`lorafleet.ml.scoring`, which devices use for federated evaluation too).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from lorafleet.data.datasets import EncodedDataset
from lorafleet.ml.model import AdapterRuntime
from lorafleet.ml.scoring import CAUSAL_BATCH, score_batches
from schemas.config import perplexity
from schemas.messages import EvalScore, LoraSpec

__all__ = ["CAUSAL_BATCH", "Evaluation", "evaluate"]


class Evaluation(NamedTuple):
    """What an evaluation measured; unpacks as ``(accuracy, loss)``."""

    accuracy: float
    loss: float

    @property
    def perplexity(self) -> float:
        """exp(loss): for a causal LM, the perplexity of the response tokens."""
        return perplexity(self.loss)


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
    score = EvalScore.total(score_batches(runtime, spec, tensors, encoded_eval, batch_size))
    return Evaluation(score.accuracy, score.loss)
