"""The progress lines name the metrics, and the one the target applies to with its target."""

from __future__ import annotations

from rich.console import Console

from lorafleet.run.progress import RunReporter
from schemas.config import parse_run_config


def _line(config: dict[str, object], accuracy: float, loss: float) -> str:
    console = Console(record=True, width=200)
    RunReporter(parse_run_config(config), console=console).round_evaluated(3, accuracy, loss)
    return console.export_text().strip()


def test_a_classifier_reports_accuracy_and_loss_with_its_accuracy_target() -> None:
    line = _line({"rounds": {"target_accuracy": 0.8}}, 0.7695, 0.604)
    assert line == "round 3 accuracy 0.7695 (target 0.8) loss 0.6040"


def test_a_causal_lm_reports_exact_match_loss_and_perplexity_with_its_loss_target() -> None:
    config = {
        "model": {"name": "tiny", "tiny_family": "llama", "task": "causal_lm"},
        "data": {"dataset": "synthetic"},
        "rounds": {"target_metric": "loss", "target": 2.5},
    }
    assert _line(config, 0.72, 1.9) == "round 3 exact match 0.7200 loss 1.9000 (target 2.5) perplexity 6.6859"


def test_without_a_target_no_target_is_named() -> None:
    assert "target" not in _line({}, 0.5, 0.7)
