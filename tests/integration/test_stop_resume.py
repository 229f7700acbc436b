"""``lorafleet stop`` and ``lorafleet run --resume`` on the real RabbitMQ and Redis.

A distributed run (the fault tests' tiny run, every service its own process: tests/integration/
test_faults.py's Fleet) is stopped in round 2 with ``lorafleet stop``: it finishes after round 2 with
reason ``stopped``, its report and adapter written. ``lorafleet run --resume`` (the launcher) takes it
up at round 3 and completes it with the final accuracy of the uninterrupted run of the same seed
(embedded, in this process: training is deterministic per seed, round and device, and the
distributed figures are the embedded ones, tests/integration/test_causal_lm_distributed.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.app.embedded import run_embedded
from schemas.config import merge_overrides, parse_run_config
from tests.integration.test_faults import (
    ACCURACY_TOLERANCE,
    MAX_ROUNDS,
    REPO,
    WAIT_S,
    _env,
    device_ids,
    fleet_of,
    run_config,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]


def _lorafleet(*args: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lorafleet", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_a_run_stopped_after_round_2_and_resumed_ends_as_the_uninterrupted_run(
    rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    config = run_config(run_id)
    with fleet_of(tmp_path / "fleet", config, rabbitmq_url, redis_url) as fleet:
        fleet.start_run(workers=device_ids())
        # When the run is asked to stop while round 2 is open
        fleet.wait_round(2)
        stopped = _lorafleet("stop", run_id, "--state", redis_url)
        assert stopped.returncode == 0 and "stop requested" in stopped.stdout, stopped.stderr
        # Then it finishes after round 2, reason stopped, with its report and adapter
        report = fleet.wait_services_done()
        fleet.wait_workers_done()
        assert (report["finish_reason"], report["final_round"]) == ("stopped", 2), report["finish_reason"]
        assert (fleet.out / "adapter" / "adapter_model.safetensors").is_file()
        listed = json.loads(_lorafleet("runs", "--state", redis_url, "--json").stdout)
        assert {"run_id": run_id, "status": "finished", "finish_reason": "stopped"}.items() <= next(
            r for r in listed if r["run_id"] == run_id
        ).items()
        # When it is resumed with the one-command launcher
        resumed = _lorafleet(
            "run", str(fleet.config_path), "--out", str(fleet.out), "--quiet", "--resume",
            "--broker", rabbitmq_url, "--state", redis_url, timeout=600,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        final = json.loads((fleet.out / "report.json").read_text(encoding="utf-8"))
        ttl = fleet.redis.ttl(f"lf:{{{run_id}}}:meta")
    # Then it went on from round 3 to the end, every round aggregated once
    assert (final["finish_reason"], final["final_round"]) == ("max_rounds", MAX_ROUNDS)
    assert [r["round"] for r in final["rounds"]] == list(range(1, MAX_ROUNDS + 1))
    assert final["updates"]["counted"] == MAX_ROUNDS * len(device_ids())
    assert 0 < ttl <= parse_run_config(config).state.retention_s  # expires after state.retention_s
    # ... with the final accuracy of the uninterrupted run of the same seed
    reference = run_embedded(
        parse_run_config(merge_overrides(config, {"devices": {"sleep": False}})), tmp_path / "ref", quiet=True
    )
    resumed_accuracy, uninterrupted = final["final_accuracy"], reference["final_accuracy"]
    print(f"stopped after round 2 and resumed: {resumed_accuracy}; uninterrupted: {uninterrupted}")
    assert abs(resumed_accuracy - uninterrupted) <= ACCURACY_TOLERANCE + 1e-9
