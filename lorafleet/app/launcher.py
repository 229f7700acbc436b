"""Distributed mode on one host: every service in its own process, over RabbitMQ and Redis.

``lorafleet run CONFIG --broker URL --state URL`` starts the orchestrator, the aggregator and one
worker process per device with the same commands a person (or compose) would run by hand, waits
for the run to finish and returns its report. Each process gets its share of the cores as torch
threads; logs go to ``OUT/logs/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lorafleet.app.wiring import open_state, open_transport
from lorafleet.transport import topology
from lorafleet.transport.base import QueueNotFound, TransportError
from schemas.config import RunConfig

log = logging.getLogger(__name__)


def service_command(
    role: str,
    config_path: Path,
    *,
    broker: str,
    state: str | None,
    out_dir: Path | None,
    device: str | None = None,
    threads: int | None = None,
) -> list[str]:
    """The CLI command line of one service."""
    cmd = [sys.executable, "-m", "lorafleet", role, str(config_path), "--broker", broker]
    if state is not None:
        cmd += ["--state", state]
    if out_dir is not None:
        cmd += ["--out", str(out_dir)]
    if device is not None:
        cmd += ["--device-id", device]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


def reset_run(config: RunConfig, broker: str, state_url: str) -> None:
    """Forget a previous run of the same id: its state and anything left in its queues."""
    state = open_state(state_url)
    try:
        state.delete_run(config.run_id)
    finally:
        state.close()
    transport = open_transport(broker)
    try:
        topology.declare_static_topology(transport)
        queues = [topology.UPDATES_QUEUE, topology.ORCHESTRATOR_QUEUE, topology.SLOTS_QUEUE]
        queues += [topology.task_queue_name(d) for d in config.device_ids()]
        for queue in queues:
            with contextlib.suppress(QueueNotFound):
                transport.purge(queue)
    except TransportError as exc:
        log.warning("could not reset queues: %s", exc)
    finally:
        transport.close()


def run_distributed(
    config: RunConfig, config_path: Path, out_dir: Path, *, broker: str, state: str, fresh: bool = True
) -> dict[str, Any]:
    """Run an experiment with every service in its own process; returns ``report.json``'s content.

    Raises:
        RuntimeError: a service exited with an error, or the run ended without a report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    (out_dir / "report.json").unlink(missing_ok=True)
    if fresh:
        reset_run(config, broker, state)
    cores = os.cpu_count() or 1
    worker_threads = max(1, cores // config.devices.count)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    handles = []
    try:
        procs["orchestrator"] = subprocess.Popen(
            service_command(
                "orchestrator", config_path, broker=broker, state=state, out_dir=out_dir, threads=1
            )
        )
        for name, cmd in [
            (
                "aggregator",
                service_command(
                    "aggregator", config_path, broker=broker, state=state, out_dir=out_dir, threads=cores
                ),
            )
        ] + [
            (
                f"worker-{d}",
                service_command(
                    "worker",
                    config_path,
                    broker=broker,
                    state=None,
                    out_dir=None,
                    device=d,
                    threads=worker_threads,
                ),
            )
            for d in config.device_ids()
        ]:
            handle = (logs / f"{name}.log").open("wb")
            handles.append(handle)
            procs[name] = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
        _wait(procs)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for handle in handles:
            handle.close()
    report_path = out_dir / "report.json"
    if not report_path.is_file():
        raise RuntimeError(f"the run ended without {report_path}; see {logs}")
    report: dict[str, Any] = json.loads(report_path.read_text(encoding="utf-8"))
    return report


def _wait(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Until the orchestrator and aggregator exit (workers exit on RunFinished)."""
    deadline_after_orchestrator: float | None = None
    while True:
        for name, proc in procs.items():
            code = proc.poll()
            if code not in (None, 0):
                raise RuntimeError(f"{name} exited with status {code}")
        if procs["orchestrator"].poll() == 0 and deadline_after_orchestrator is None:
            deadline_after_orchestrator = time.monotonic() + 120.0
        if all(p.poll() == 0 for n, p in procs.items() if not n.startswith("worker-")):
            deadline_workers = time.monotonic() + 60.0
            while time.monotonic() < deadline_workers and any(p.poll() is None for p in procs.values()):
                time.sleep(0.2)
            return
        if deadline_after_orchestrator is not None and time.monotonic() > deadline_after_orchestrator:
            raise RuntimeError("the aggregator did not finish within 120 s of the orchestrator")
        time.sleep(0.2)
