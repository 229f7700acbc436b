"""A whole embedded run on the tiny model; its adapter reloads with plain peft and reproduces it."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.verify_adapter import accuracy_of_adapter
from lorafleet.app.embedded import run_embedded
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


def _burn(seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(10_000))


def test_the_virtual_clock_gives_the_same_times_however_loaded_the_host_is(tmp_path: Path) -> None:
    import multiprocessing

    # Given a heterogeneous run (speed tiers, jitter, LEGEND-style plans from measured capacity)
    config = parse_run_config(
        {
            "run_id": "clock",
            "strategy": "legend",
            "model": {"name": "tiny", "tiny_layers": 4, "tiny_hidden": 32, "max_seq_len": 32},
            "data": {"dataset": "synthetic", "samples_per_device": 64, "eval_samples": 100},
            "devices": {
                "count": 4,
                "jitter": 0.1,
                "tiers": [
                    {"name": "fast", "fraction": 0.5, "speed": 1.0, "uplink_mbps": 20.0},
                    {"name": "slow", "fraction": 0.5, "speed": 0.2, "uplink_mbps": 1.0},
                ],
            },
            "rounds": {"max_rounds": 3},
        }
    )
    quiet = run_embedded(config, tmp_path / "quiet", quiet=True)
    # When the same seed runs again while other processes keep every core busy
    burners = [multiprocessing.get_context("spawn").Process(target=_burn, args=(120.0,)) for _ in range(3)]
    for b in burners:
        b.start()
    try:
        loaded = run_embedded(config, tmp_path / "loaded", quiet=True)
    finally:
        for b in burners:
            b.terminate()
            b.join(timeout=10)
    # Then every round lasts as long on the virtual clock (the wall clock does not matter), and the
    # plans built from the measured capacity are the same
    for a, b in zip(quiet["rounds"], loaded["rounds"], strict=True):
        assert a["virtual_time_s"] > 0
        assert abs(a["virtual_time_s"] - b["virtual_time_s"]) <= 1e-3 * a["virtual_time_s"], (a, b)
        assert a["depths"] == b["depths"]
    assert len({round(r["virtual_round_s"], 6) for r in quiet["rounds"]}) > 1  # rounds do differ
