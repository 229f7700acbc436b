"""Distributed mode on one host: every service in its own process, over RabbitMQ and Redis.

``lorafleet run CONFIG --broker URL --state URL`` starts the orchestrator, the aggregator and one
worker process per device with the same commands a person (or compose) would run by hand, restarts
any that dies (lorafleet/app/supervisor.py), waits for the run to finish and returns its report.
Each process gets its share of the cores as torch threads, and where there are more workers than
cores the workers take turns at training, one a core (worker/host_turns.py). Logs go to
``OUT/logs/``. The services are forked from one warm zygote (lorafleet/app/zygote.py), which
imported torch and the rest once for all of them: ps shows each with its own command line, and each
behaves as that command started by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from lorafleet.app.connections import open_state, open_transport
from lorafleet.app.supervisor import Child, RestartPolicy, Supervisor
from lorafleet.app.zygote import SERVICE_PREFIX, zygote
from lorafleet.ml.cores import usable_cores
from lorafleet.run.recovery import snapshot_dir
from lorafleet.run.stopping import reopen_run
from lorafleet.security.signing import FLEET_KEY_ENV
from lorafleet.settings import load_settings
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
    cmd = [*SERVICE_PREFIX, role, str(config_path), "--broker", broker]
    if state is not None:
        cmd += ["--state", state]
    if out_dir is not None:
        cmd += ["--out", str(out_dir)]
    if device is not None:
        cmd += ["--device-id", device]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd


def host_turns(workers: int, cores: int) -> int:
    """How many of ``workers`` on a host of ``cores`` train at once: one a core, each on one torch
    thread (worker/host_turns.py), or all of them where there are no more workers than cores."""
    return max(1, min(workers, cores))


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
        if config.eval.federated:
            queues += [topology.eval_queue_name(d) for d in config.device_ids()]
        for queue in queues:
            with contextlib.suppress(QueueNotFound):
                transport.purge(queue)
    except TransportError as exc:
        log.warning("could not reset queues: %s", exc)
    finally:
        transport.close()


def _reopen(config: RunConfig, state_url: str) -> None:
    """``--resume``: a stopped run taken up again (lorafleet/run/stopping.py); an interrupted one is
    resumed by the services as they start."""
    state = open_state(state_url)
    try:
        if reopen_run(state, config.run_id):
            log.info("resuming stopped run %s", config.run_id)
    finally:
        state.close()


def _service_env(config: RunConfig) -> dict[str, str]:
    """The services' environment: this one, plus a fleet key made for this run where signatures are
    required and none was given (the workers derive their device keys from it)."""
    env = dict(os.environ)
    settings = load_settings()
    if config.security.require_signatures and settings.fleet_key is None:
        env[FLEET_KEY_ENV] = secrets.token_hex(32)
    return env


def run_distributed(
    config: RunConfig,
    config_path: Path,
    out_dir: Path,
    *,
    broker: str,
    state: str,
    fresh: bool = True,
    policy: RestartPolicy | None = None,
    service_args: list[str] | None = None,
) -> dict[str, Any]:
    """Run an experiment with every service in its own process, supervised (lorafleet/app/supervisor.py);
    returns ``report.json``'s content. ``service_args`` go on every service's command line (logging
    options, ``--set`` overrides).

    Raises:
        CrashLoop: a service kept dying.
        RuntimeError: the run ended without a report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    (out_dir / "report.json").unlink(missing_ok=True)
    if fresh:
        reset_run(config, broker, state)
        shutil.rmtree(snapshot_dir(out_dir), ignore_errors=True)  # a fresh run restores nothing old
    else:
        _reopen(config, state)
    cores = usable_cores()
    turns = host_turns(config.devices.count, cores)
    worker_threads = max(1, cores // turns)
    # more workers than cores: they take turns, and so does the aggregator's evaluation beside them
    taking_turns = ["--turns", str(turns)] if turns < config.devices.count else []
    supervisor = Supervisor(logs, policy=policy, spawn=zygote(_service_env(config)))
    extra = list(service_args or [])
    try:
        aggregator = ["--threads", str(worker_threads if taking_turns else cores), *taking_turns]
        for role, options in (("orchestrator", ["--threads", "1"]), ("aggregator", aggregator)):
            command = service_command(role, config_path, broker=broker, state=state, out_dir=out_dir)
            supervisor.start(role, [*command, *options, *extra])
        for d in config.device_ids():
            supervisor.start(
                f"worker-{d}",
                [
                    *service_command(
                        "worker",
                        config_path,
                        broker=broker,
                        state=None,
                        out_dir=None,
                        device=d,
                        threads=worker_threads,
                    ),
                    *taking_turns,
                    *extra,
                ],
            )
        _supervise(supervisor, grace_s=AGGREGATOR_GRACE_S + config.eval.wait_s)
    finally:
        supervisor.stop_all()
    report_path = out_dir / "report.json"
    if not report_path.is_file():
        raise RuntimeError(f"the run ended without {report_path}; see {logs}")
    report: dict[str, Any] = json.loads(report_path.read_text(encoding="utf-8"))
    return report


#: how long the aggregator may take to finish after the orchestrator, and workers after both
AGGREGATOR_GRACE_S = 120.0
WORKER_GRACE_S = 60.0


def _supervise(supervisor: Supervisor, poll_s: float = 0.2, grace_s: float = AGGREGATOR_GRACE_S) -> None:
    """Until the orchestrator and the aggregator are done (workers exit on RunFinished); a dead service
    is restarted, except a worker once the run is over. The aggregator may take ``grace_s`` longer than
    the orchestrator (it waits for the devices' evaluations of the last round)."""
    orchestrator_done_at: float | None = None

    def restart(child: Child) -> bool:
        return not (child.name.startswith("worker-") and supervisor.done("orchestrator"))

    while True:
        supervisor.check(restart=restart)
        if supervisor.done("orchestrator") and orchestrator_done_at is None:
            orchestrator_done_at = time.monotonic()
        if supervisor.done("orchestrator") and supervisor.done("aggregator"):
            deadline = time.monotonic() + WORKER_GRACE_S
            while time.monotonic() < deadline and any(supervisor.alive(n) for n in supervisor.children):
                time.sleep(poll_s)
            return
        grace = grace_s
        if orchestrator_done_at is not None and time.monotonic() > orchestrator_done_at + grace:
            raise RuntimeError(f"the aggregator did not finish {grace:.0f} s after the orchestrator")
        time.sleep(poll_s)
