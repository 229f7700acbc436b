"""A whole embedded run on the tiny model; its adapter reloads with plain peft and reproduces it."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.verify_adapter import accuracy_of_adapter
from lorafleet.embedded import run_embedded
from schemas.config import parse_run_config


def test_embedded_run_writes_a_report_and_an_adapter_that_peft_reloads_exactly(tmp_path: Path) -> None:
    config = parse_run_config(
        {
            "run_id": "e2e",
            "model": {"name": "tiny", "tiny_layers": 2, "tiny_hidden": 32, "max_seq_len": 32},
            "data": {"dataset": "synthetic", "samples_per_device": 96, "eval_samples": 200},
            "devices": {"count": 3},
            "lora": {"rank": 4},
            "training": {"lr": 5.0e-3, "local_epochs": 2},
            "rounds": {"max_rounds": 3},
        }
    )
    report = run_embedded(config, tmp_path, quiet=True)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    # the report has the documented shape
    assert on_disk["strategy"] == "fedlora" and on_disk["final_round"] == 3
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2, 3]
    for entry in on_disk["rounds"]:
        assert {
            "round",
            "accuracy",
            "loss",
            "wall_time_s",
            "bytes_up",
            "bytes_down",
            "devices_reported",
        } <= set(entry)
        assert entry["devices_reported"] == 3 and entry["bytes_up"] > 0 and entry["bytes_down"] > 0
    assert on_disk["final_accuracy"] == report["final_accuracy"]
    # the adapter is a PEFT checkpoint that reproduces the reported final accuracy exactly
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    measured, reported = accuracy_of_adapter(tmp_path)
    assert measured == reported
