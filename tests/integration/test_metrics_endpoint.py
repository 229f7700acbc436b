"""``--metrics-port`` on a distributed run: every service its own process over the real RabbitMQ and
Redis, ``/metrics`` scraped over HTTP while the run goes on.

The orchestrator's and the aggregator's endpoints show the run's counters (read from Redis) moving
between two scrapes; a worker's shows what its process did. Workers wait out an emulated device time
(``devices.sleep``), so rounds last long enough to scrape inside the run at no CPU cost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.app.launcher import service_command
from lorafleet.state.redis import RedisStateStore
from tests.pipeline.test_metrics import Samples, value

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 240.0  # bound on any one wait (the host's cores are shared)
FLEET_KEY = "6d657472" * 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(what: str, check: Callable[[], Samples | None], procs: list[subprocess.Popen[bytes]]) -> Samples:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"a service ended while waiting for {what}: {dead}"
        try:
            found = check()
        except OSError:  # not serving yet
            found = None
        if found is not None:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def closed(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "lorafleet_rounds_closed_total")


@pytest.fixture
def run_config(tmp_path: Path, run_id: str) -> Path:
    config = {
        "run_id": run_id,
        "model": {"name": "tiny", "max_seq_len": 32, "tiny_layers": 2, "tiny_hidden": 32, "torch_threads": 1},
        "data": {"dataset": "synthetic", "samples_per_device": 32},
        "lora": {"rank": 4},
        "training": {"batch_size": 16},
        "devices": {"count": 2, "sleep": True, "profile": {"speed": 0.05}},
        "rounds": {"max_rounds": 30, "lease_s": 60.0, "heartbeat_s": 2.0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def services(
    run_config: Path, rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> Iterator[tuple[dict[str, int], list[subprocess.Popen[bytes]], Path]]:
    """Orchestrator, aggregator and two workers; ports of the orchestrator, aggregator and dev-0000."""
    env = {**os.environ, "LORAFLEET_FLEET_KEY": FLEET_KEY, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ports = {name: free_port() for name in ("orchestrator", "aggregator", "dev-0000")}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    for name, role, device in (
        ("orchestrator", "orchestrator", None),
        ("aggregator", "aggregator", None),
        ("dev-0000", "worker", "dev-0000"),
        ("dev-0001", "worker", "dev-0001"),
    ):
        command = service_command(
            role,
            run_config,
            broker=rabbitmq_url,
            state=None if role == "worker" else redis_url,
            out_dir=None if role == "worker" else tmp_path / "out",
            device=device,
            threads=1,
        )
        if name in ports:
            command += ["--metrics-port", str(ports[name])]
        command += ["--log-format", "json", "--log-level", "INFO"]
        with (logs / f"{name}.log").open("wb") as log:
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield ports, procs, logs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        store = RedisStateStore(redis_url)
        store.delete_run(run_id)
        store.close()


@pytest.mark.timeout(400)
def test_the_services_metrics_move_during_a_distributed_run(
    services: tuple[dict[str, int], list[subprocess.Popen[bytes]], Path], run_id: str
) -> None:
    ports, procs, logs = services
    orchestrator = ports["orchestrator"]

    # Given a run whose first round has closed and been evaluated
    def first_round() -> Samples | None:
        samples = scrape(orchestrator)
        evaluated = ("lorafleet_accuracy", (("run_id", run_id),)) in samples
        return samples if closed(samples) >= 1 and evaluated else None

    first = wait_for("a first evaluated round", first_round, procs)

    # When it is scraped again after another round closed
    def next_round() -> Samples | None:
        samples = scrape(orchestrator)
        return samples if closed(samples) > closed(first) else None

    second = wait_for("another closed round", next_round, procs)

    # Then its counters moved: updates, bytes both ways, round durations; its gauges hold the run's state
    for name, labels in (
        ("lorafleet_updates_total", {"outcome": "counted"}),
        ("lorafleet_bytes_up_total", {}),
        ("lorafleet_bytes_down_total", {}),
        ("lorafleet_round_duration_seconds_count", {}),
    ):
        assert value(second, name, **labels) > value(first, name, **labels), name
    assert 0.0 <= value(second, "lorafleet_accuracy") <= 1.0
    assert value(second, "lorafleet_loss") > 0.0
    assert value(second, "lorafleet_devices_registered") == value(second, "lorafleet_devices_alive") == 2
    assert value(second, "lorafleet_state_up") == 1
    assert value(second, "lorafleet_dead_letter_queue_messages") == 0
    # ... the aggregator serves the same run (read from the same Redis) ...
    aggregator = scrape(ports["aggregator"])
    assert value(aggregator, "lorafleet_updates_total", outcome="counted") >= value(
        second, "lorafleet_updates_total", outcome="counted"
    )
    # ... and the worker what its process did
    worker = scrape(ports["dev-0000"])
    assert value(worker, "lorafleet_worker_tasks_total", outcome="done", device_id="dev-0000") >= 1
    assert value(worker, "lorafleet_worker_training_seconds_count") >= 1
    assert value(worker, "lorafleet_worker_bytes_up_total") > 0
    assert value(worker, "process_resident_memory_bytes") > 0
    _check_json_logs(logs, run_id)


def _check_json_logs(logs: Path, run_id: str) -> None:
    """Every line the services logged is a JSON object with the run's context (--log-format json)."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for path in logs.glob("*.log"):
        text = path.read_text(encoding="utf-8")
        lines[path.stem] = [json.loads(line) for line in text.splitlines() if line]
    assert all(entry["run_id"] == run_id for entries in lines.values() for entry in entries)
    worker = lines["dev-0000"]
    assert worker and all(entry["device_id"] == "dev-0000" for entry in worker)
    assert any("round" in entry for entry in lines["orchestrator"] + lines["aggregator"] + worker)
