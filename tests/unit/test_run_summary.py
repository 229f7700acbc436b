"""The lines ``lorafleet run`` ends with: result, files, and the FedLoRA comparison command."""

from __future__ import annotations

from pathlib import Path

from lorafleet.app.summary import run_summary


def test_a_legend_run_ends_with_its_files_and_the_fedlora_command_on_the_same_configuration() -> None:
    report = {
        "strategy": "legend",
        "final_accuracy": 0.81,
        "final_round": 5,
        "wall_time_s": 95.4,
        "virtual_time_s": 12.0,
    }
    lines = run_summary(
        report, Path("runs/quickstart"), Path("examples/quickstart.yaml"), ["rounds.max_rounds=9"]
    ).splitlines()
    assert lines[0] == "final accuracy 0.81 after 5 rounds (95 s of run, 12 virtual s)"
    assert lines[1:4] == [
        "report:  runs/quickstart/report.json",
        "plot:    runs/quickstart/report.png",
        "adapter: runs/quickstart/adapter  "
        "(try: lorafleet predict runs/quickstart/adapter --text 'a witty film')",
    ]
    assert lines[4] == (
        "compare with FedLoRA: lorafleet run examples/quickstart.yaml --out runs/quickstart-fedlora "
        "--set rounds.max_rounds=9 --set strategy=fedlora"
    )


def test_a_fedlora_run_has_nothing_to_compare_with_and_missing_times_are_left_out() -> None:
    report = {"strategy": "fedlora", "final_accuracy": None, "final_round": 0}
    lines = run_summary(report, Path("out dir"), Path("c.yaml")).splitlines()
    assert lines[0] == "final accuracy None after 0 rounds"
    assert len(lines) == 4 and "'out dir/adapter'" in lines[3]
