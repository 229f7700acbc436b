"""An embedded run gives the same results whether its devices train one after another in its own
process or side by side in training lanes (worker/lanes.py): same messages in the same order, and a
task's training depends only on its inputs and seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.app.embedded import run_embedded
from schemas.config import load_run_config

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, lanes: int, strategy: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = load_run_config(
        REPO / "examples" / "tiny.yaml",
        overrides={
            "strategy": strategy,
            "model": {"lanes": lanes, "torch_threads": 1},
            "devices": {"count": 5},
            "rounds": {"max_rounds": 3},
            "eval": {"device_fraction": 0.25},  # federated evaluation on the devices too
        },
    )
    out = tmp_path / f"{strategy}-{lanes}"
    report = run_embedded(config, out, quiet=True)
    return report, load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("strategy", ["fedlora", "legend"])
def test_lanes_change_nothing_but_the_wall_time(tmp_path: Path, strategy: str) -> None:
    alone, alone_adapter = _run(tmp_path, 1, strategy)
    laned, laned_adapter = _run(tmp_path, 3, strategy)
    keys = ("accuracy", "loss", "federated_accuracy", "virtual_time_s", "devices_reported", "bytes_up")
    assert [[r[k] for k in keys] for r in laned["rounds"]] == [[r[k] for k in keys] for r in alone["rounds"]]
    assert laned["updates"] == alone["updates"] and laned["final_round"] == alone["final_round"] == 3
    assert alone_adapter.keys() == laned_adapter.keys()
    assert all(torch.equal(alone_adapter[k], laned_adapter[k]) for k in alone_adapter)
