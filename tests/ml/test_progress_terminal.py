"""What an embedded run shows on the terminal: a bar per round with its updates, and every round's
accuracy on that round's line (rich.progress, recorded)."""

from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console

from lorafleet.app.embedded import run_embedded
from schemas.config import parse_run_config


def test_an_embedded_run_shows_a_bar_per_round_with_its_accuracy(tmp_path: Path) -> None:
    # Given a three-round run of three devices on the tiny model, its terminal recorded
    config = parse_run_config(
        {
            "run_id": "progress",
            "model": {"name": "tiny", "tiny_layers": 2, "tiny_hidden": 32, "max_seq_len": 32},
            "data": {"dataset": "synthetic", "samples_per_device": 32, "eval_samples": 64},
            "devices": {"count": 3},
            "lora": {"rank": 4},
            "rounds": {"max_rounds": 3, "target_accuracy": 0.99},
        }
    )
    console = Console(record=True, width=200)

    # When it runs
    report = run_embedded(config, tmp_path, console=console)

    # Then each round has one line: its bar, 3/3 updates, elapsed and ETA, then its accuracy (the
    # target's metric, with the target) and how it closed
    text = console.export_text()
    for entry in report["rounds"]:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"round {entry['round']}/3 "))
        assert re.search(r"━+ 3/3 updates \d:\d\d:\d\d eta", line), line
        assert f"accuracy {entry['accuracy']:.4f} (target 0.99)" in line, line
        assert "quorum" in line, line
    # ... the last round's accuracy is shown below the bars, and the run's end
    last = report["rounds"][-1]
    assert f"last evaluated: round 3 accuracy {last['accuracy']:.4f}" in text
    assert "run finished (max_rounds) after round 3" in text


def test_quiet_shows_nothing(tmp_path: Path) -> None:
    config = parse_run_config(
        {
            "run_id": "quiet",
            "model": {"name": "tiny", "tiny_layers": 1, "tiny_hidden": 16, "max_seq_len": 16},
            "data": {"dataset": "synthetic", "samples_per_device": 16, "eval_samples": 16},
            "devices": {"count": 2},
            "rounds": {"max_rounds": 1},
        }
    )
    console = Console(record=True, width=200)
    run_embedded(config, tmp_path, console=console, quiet=True)
    assert console.export_text() == ""
