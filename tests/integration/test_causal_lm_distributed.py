"""Causal-LM instruction tuning, distributed: every service its own process over RabbitMQ and Redis.

The example (examples/causal_lm_tiny.yaml: a tiny random Llama, loss on the response tokens) runs
with ``lorafleet run --broker --state`` and in embedded mode; the eval loss falls by at least 30% and
is the same per round in both modes (training is deterministic per seed, round and device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.app.embedded import run_embedded
from lorafleet.state.redis import RedisStateStore
from schemas.config import load_run_config

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "causal_lm_tiny.yaml"


def _losses(report: dict[str, object]) -> list[float]:
    rounds = report["rounds"]
    assert isinstance(rounds, list)
    return [float(r["loss"]) for r in rounds]


@pytest.mark.timeout(600)
def test_the_causal_lm_example_learns_the_same_distributed_as_embedded(
    rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    config_path = tmp_path / "causal.yaml"
    config_path.write_text(EXAMPLE.read_text(encoding="utf-8") + f"\nrun_id: {run_id}\n", encoding="utf-8")
    # Given the example run embedded (the reference) ...
    embedded = run_embedded(load_run_config(config_path), tmp_path / "embedded", quiet=True)
    # When it runs distributed, every service in its own process
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lorafleet", "run", str(config_path), "--out", str(tmp_path / "dist")]
    command += ["--broker", rabbitmq_url, "--state", redis_url]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    finally:
        store = RedisStateStore(redis_url)
        store.delete_run(run_id)
        store.close()
    assert done.returncode == 0, done.stderr[-4000:]
    distributed = json.loads((tmp_path / "dist" / "report.json").read_text(encoding="utf-8"))
    # Then the eval loss falls by at least 30% over the run, round for round as embedded
    losses = _losses(distributed)
    print(f"eval loss per round: distributed {losses}, embedded {_losses(embedded)}")
    assert losses[-1] <= 0.7 * losses[0], losses
    # equal up to float summation order (workers train on one torch thread each, embedded on all)
    assert losses == pytest.approx(_losses(embedded), rel=1e-3)
    assert distributed["final_round"] == embedded["final_round"]
