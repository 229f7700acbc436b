"""Federated evaluation in a round's metrics (the state store) and in ``report.json``.

The aggregator writes two entries into the metrics of a round whose global adapter it sent out for
evaluation (aggregator/federated_eval.py): :data:`EVAL_SENT`, the devices the ``EvalTask`` went to
and its size, and :data:`EVAL_SCORES`, each reporting device's :class:`~schemas.messages.EvalScore`.
The pooled figures are computed from the scores where they are read (:func:`federated_entry`), so each
count is stored once.
"""

from __future__ import annotations

from typing import Any

from schemas.messages import EvalScore

#: round metrics: ``{"devices": [device ids the round's EvalTask went to], "bytes": its encoded size}``
EVAL_SENT = "eval_sent"
#: round metrics: ``{device id: EvalScore as JSON}``, one per device that reported
EVAL_SCORES = "eval_scores"


def device_scores(metrics: dict[str, Any]) -> dict[str, EvalScore]:
    """The devices' scores stored in one round's metrics."""
    return {d: EvalScore.model_validate(s, strict=False) for d, s in metrics.get(EVAL_SCORES, {}).items()}


def pooled(metrics: dict[str, Any]) -> EvalScore | None:
    """The score of every reporting device's held-out rows together (None: none reported): accuracy
    weighted by their rows, loss by their loss terms (rows of a classifier, response tokens of a causal
    LM), as the central evaluation counts them."""
    scores = device_scores(metrics)
    return EvalScore.total(scores[d] for d in sorted(scores)) if scores else None


def federated_entry(metrics: dict[str, Any]) -> dict[str, Any]:
    """A round's federated fields in ``report.json``: ``federated_accuracy``, ``federated_loss`` and
    ``federated_devices`` (each reporting device's held-out rows)."""
    score = pooled(metrics)
    return {
        "federated_accuracy": None if score is None else score.accuracy,
        "federated_loss": None if score is None else score.loss,
        "federated_devices": {d: s.num_samples for d, s in sorted(device_scores(metrics).items())},
    }
