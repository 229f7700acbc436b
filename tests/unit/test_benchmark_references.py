"""The benchmarks' reference rows (benchmarks/references.py): the centralized run trains on exactly the
pooled rows of the federated devices, each local-only run on exactly one device's rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.references import bounds_table, reference_rows
from lorafleet.data.datasets import load_train, partition_rows
from lorafleet.data.labels import SENTIMENT
from schemas.config import parse_run_config

BASE: dict[str, Any] = {
    "run_id": "ref",
    "seed": 3,
    "model": {"name": "tiny", "tiny_layers": 2, "tiny_hidden": 32, "max_seq_len": 32, "torch_threads": 1},
    "data": {
        "dataset": "synthetic",
        "samples_per_device": 12,
        "eval_samples": 40,
        "partition": "dirichlet",
        "alpha": 0.3,
    },
    "lora": {"rank": 4, "target_modules": ["query", "value"]},
    "training": {"batch_size": 8, "lr": 0.01, "local_epochs": 2},
    "devices": {
        "count": 3,
        "jitter": 0.1,
        "tiers": [
            {"name": "fast", "fraction": 0.5, "speed": 1.0},
            {"name": "slow", "fraction": 0.5, "speed": 0.2},
        ],
    },
}


def _rows(path: Path) -> list[tuple[str, str]]:
    return [(r["text"], r["label"]) for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())]


def test_centralized_pools_every_device_row_and_local_only_trains_each_device_alone(tmp_path: Path) -> None:
    # Given the benchmark's fleet of three label-skewed devices
    config = parse_run_config(BASE)
    train = load_train(config)
    shards = partition_rows(train, config)
    # When the reference rows run for FedLoRA's 3 rounds
    rows = reference_rows(BASE, 3, tmp_path)
    # Then the centralized run held the union of the shards (by text and label), 3 x 2 passes per row
    expected = sorted((train.texts[i], SENTIMENT[train.labels[i]]) for s in shards for i in s)
    assert sorted(_rows(tmp_path / "pooled.jsonl")) == expected
    central = json.loads((tmp_path / "centralized" / "fedlora" / "report.json").read_text(encoding="utf-8"))
    assert central["config"]["devices"]["count"] == 1
    assert central["config"]["training"]["local_epochs"] == 2 and len(central["rounds"]) == 3
    assert rows["centralized"]["rows"] == len(expected) and rows["centralized"]["steps_per_row"] == 6
    # ... and each local-only run held one device's rows, for the same 6 passes in one round
    for d, shard in enumerate(shards):
        held = _rows(tmp_path / "local" / f"device-{d:04d}.jsonl")
        assert sorted(held) == sorted((train.texts[i], SENTIMENT[train.labels[i]]) for i in shard)
        report = json.loads(
            (tmp_path / "local" / f"device-{d:04d}" / "fedlora" / "report.json").read_text(encoding="utf-8")
        )
        assert report["config"]["training"]["local_epochs"] == 6 and len(report["rounds"]) == 1
    local = rows["local_only"]
    assert len(local["device_accuracies"]) == 3
    assert local["final_accuracy"] == pytest.approx(sum(local["device_accuracies"]) / 3)
    assert local["min_accuracy"] <= local["final_accuracy"] <= local["best_accuracy"]


def test_a_seeded_sample_of_devices_can_stand_for_the_floor(tmp_path: Path) -> None:
    # When the local-only floor is taken over 2 of the 3 devices
    local = reference_rows(BASE | {"seed": 5}, 1, tmp_path, local_devices=2)["local_only"]
    # Then two devices, the same two for the seed, trained alone, and the row says it was a sample
    assert local["fleet"] == 3 and len(local["devices"]) == 2 == len(local["device_accuracies"])
    assert sorted(p.stem for p in (tmp_path / "local").glob("*.jsonl")) == [
        f"device-{d:04d}" for d in local["devices"]
    ]
    refs = {"local_only": local | {"steps_per_row": 2}}
    assert "mean of 2 devices (a seeded sample of the 3)" in bounds_table(refs, {})


def test_the_bounds_table_says_where_the_best_federated_row_sits() -> None:
    refs = {
        "centralized": {"final_accuracy": 0.8, "best_accuracy": 0.8, "rows": 10, "steps_per_row": 4},
        "local_only": {
            "final_accuracy": 0.4,
            "best_accuracy": 0.5,
            "min_accuracy": 0.3,
            "device_accuracies": [0.3, 0.4, 0.5],
            "steps_per_row": 4,
        },
    }
    within = bounds_table(
        refs, {"fedlora": {"accuracy_at_budget": 0.5}, "legend": {"accuracy_at_budget": 0.7}}
    )
    assert "legend 0.7000, within the bounds, 75% of the way" in within
    above = bounds_table(refs, {"fedlora": {"accuracy_at_budget": 0.85}})
    assert "above the ceiling" in above
    assert "below the floor" in bounds_table(refs, {"fedlora": {"accuracy_at_budget": 0.2}})
    assert bounds_table({}, {"fedlora": {"accuracy_at_budget": 0.2}}) == ""
    # the ceiling is the centralized run's best round, not its last (which can be past its best)
    past = refs | {"centralized": refs["centralized"] | {"final_accuracy": 0.6}}
    table = bounds_table(past, {"fedlora": {"accuracy_at_budget": 0.7}})
    assert "| centralized (ceiling) | 0.8000 |" in table and "final 0.6000" in table
    assert "within the bounds, 75% of the way" in table
