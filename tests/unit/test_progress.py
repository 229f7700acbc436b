"""The progress: bars per round that follow the updates, and lines that name the metrics (the one the
target applies to with its target)."""

from __future__ import annotations

import re

from rich.console import Console

from lorafleet.run.progress import RunReporter, hierarchical_progress
from lorafleet.run.round_numbers import intra_round
from lorafleet.state.memory import InMemoryStateStore
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


def _bars(reporter: RunReporter, console: Console) -> str:
    reporter.close()  # the live bars are rendered once more when the display stops
    return console.export_text()


def test_the_bar_follows_the_updates_in_the_state_store() -> None:
    # Given round 1 of a run with four tasks, two of them reported
    state = InMemoryStateStore()
    tasks = {f"t{i}": f"dev-000{i}" for i in range(4)}
    state.open_round("r", 1, tasks, dict.fromkeys(tasks, "{}"), quorum=4, deadline_ms=10**12, now_ms=0)
    for task in ("t0", "t1"):
        state.record_update("r", 1, task, tasks[task], b"u", now_ms=1)
    console = Console(record=True, width=200)
    reporter = RunReporter(
        parse_run_config({"run_id": "r", "rounds": {"max_rounds": 5}}), console=console, state=state
    )
    reporter.round_opened(1, 4)

    # When the reporter polls the state store
    reporter.poll()

    # Then the round's bar shows two of four updates
    assert re.search(r"^round 1/5 [━╸╺ ]+ 2/4 updates", _bars(reporter, console), re.M)


def test_a_round_stays_live_until_evaluated_and_the_last_accuracy_stays_below() -> None:
    console = Console(record=True, width=200)
    reporter = RunReporter(parse_run_config({"rounds": {"max_rounds": 2}}), console=console)
    reporter.round_opened(1, 2)
    reporter.update_received(1, 1)
    reporter.round_closed(1, {"close_reason": "deadline", "devices_reported": 1, "tasks_issued": 2})
    reporter.round_opened(2, 2)
    reporter.round_evaluated(1, 0.61, 0.9)
    printed = console.export_text(clear=False)
    # round 1, closed and evaluated, was printed for good: bar, updates, accuracy and close on one line
    line = r"^round 1/2 [━╸╺ ]+ 1/2 updates .* accuracy 0\.6100 loss 0\.9000  deadline"
    assert re.search(line, printed, re.M)
    shown = _bars(reporter, console)
    assert re.search(r"^round 2/2 [━╸╺ ]+ 0/2 updates", shown, re.M)  # still open: live until the end
    assert "last evaluated: round 1 accuracy 0.6100 loss 0.9000" in shown


def test_hierarchical_progress_counts_updates_of_the_groups_rounds_against_their_targets() -> None:
    # Given global round 1 with group 0 at target 2 (2 devices) and group 1 at target 1 (3 devices)
    state = InMemoryStateStore()
    state.open_global_round("h", 1, {0: 2, 1: 1})
    groups = {0: ["a", "b"], 1: ["c", "d", "e"]}
    for group, devices in groups.items():
        tasks = {f"{group}-{d}": d for d in devices}
        round_no = intra_round(1, group, 1)
        state.open_round("h", round_no, tasks, dict.fromkeys(tasks, "{}"), 9, 10**12, 0)
        state.record_update("h", round_no, next(iter(tasks)), devices[0], b"u", now_ms=1)
    # Then: one update each so far, of 2*2 + 1*3 expected
    assert hierarchical_progress(state, "h", 1) == (2, 7)
    assert hierarchical_progress(state, "h", 2) is None


def test_a_round_announced_again_after_it_was_printed_for_good_prints_a_line() -> None:
    # Given round 1 closed, evaluated and printed for good
    console = Console(record=True, width=200)
    reporter = RunReporter(parse_run_config({"rounds": {"max_rounds": 3}}), console=console)
    reporter.round_opened(1, 2)
    reporter.round_closed(1, {"close_reason": "quorum", "devices_reported": 2, "tasks_issued": 2})
    reporter.round_evaluated(1, 0.6, 0.9)
    # When a restored run announces it again (its close and its evaluation)
    reporter.round_closed(1, {"close_reason": "quorum", "devices_reported": 2, "tasks_issued": 2})
    reporter.round_evaluated(1, 0.6, 0.9)
    # Then each is a line (before: KeyError on the bar the display no longer had, which ended the service)
    assert "round 1 accuracy 0.6000 loss 0.9000" in _bars(reporter, console)


def test_a_round_opened_after_the_final_one_leaves_no_bar_behind() -> None:
    # Given an embedded run whose round 2 reached the target while round 3 trained (evaluation lags)
    console = Console(record=True, width=200)
    reporter = RunReporter(parse_run_config({"rounds": {"max_rounds": 5}}), console=console)
    for round_no in (1, 2):
        reporter.round_opened(round_no, 2)
        reporter.round_closed(round_no, {"close_reason": "quorum", "devices_reported": 2, "tasks_issued": 2})
        reporter.round_evaluated(round_no, 0.7 + round_no / 100, 0.5)
    reporter.round_opened(3, 2)
    reporter.update_received(3, 1)
    # When the run finishes after round 2
    reporter.finished("target_accuracy", 2, 0.72, 12.0)
    printed = console.export_text()
    # Then rounds 1 and 2 are printed and round 3's bar, which never ends, is not (it was, at 1/2)
    assert re.search(r"^round 2/5 .* accuracy 0\.7200", printed, re.M)
    assert "round 3/5" not in printed
    assert "run finished (target_accuracy) after round 2: accuracy 0.7200" in printed
