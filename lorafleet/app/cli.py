"""The ``lorafleet`` command line (:data:`HELP` is what ``lorafleet --help`` says).

Every command that reads a run configuration takes ``--set section.field=value`` overrides, merged
into the file and validated with it; the service commands take ``--log-format``, ``--log-level``
and ``--metrics-port``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Protocol

import typer
from rich.console import Console
from rich.markup import escape

from lorafleet import __version__
from lorafleet.app import adapter_commands, data_commands
from lorafleet.app.logs import LogFormat, LogLevel, RoundFollower, configure_logging, set_log_context
from lorafleet.app.summary import run_summary
from lorafleet.security.signing import DEVICE_KEY_ENV, FLEET_KEY_ENV, derive_device_key, settings_key
from lorafleet.settings import env_name
from schemas.config import RunConfig, load_run_config, merge_overrides, parse_override
from schemas.errors import ConfigError, LorafleetError, NoFreeSlot

if TYPE_CHECKING:  # the services' modules import torch: only the commands that need them load them
    from prometheus_client.registry import CollectorRegistry

    from lorafleet.app.metrics_server import MetricsServer
    from lorafleet.app.worker_metrics import WorkerObserver
    from lorafleet.ml.model import AdapterRuntime
    from lorafleet.state.base import StateStore
    from lorafleet.transport.base import Transport
    from worker.host_turns import HostTurns
    from worker.slots import SlotLease

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger(__name__)
HELP = (
    "Federated LoRA fine-tuning across edge devices. 'lorafleet run CONFIG --out DIR' runs a whole "
    "experiment (in one process, or over RabbitMQ and Redis with --broker and --state); 'lorafleet "
    "orchestrator', 'aggregator' and 'worker' run one service against RabbitMQ and Redis."
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, rich_markup_mode=None)
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    """End the command with ``error: MESSAGE`` on stderr (the message printed as is, never as markup)."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


ConfigArg = Annotated[Path, typer.Argument(help="Run configuration (YAML), e.g. examples/quickstart.yaml")]
BrokerOpt = Annotated[
    str,
    typer.Option(
        "--broker", envvar=env_name("broker_url"), help="RabbitMQ URL, amqp://user:pass@host:5672/vhost"
    ),
]
StateOpt = Annotated[
    str, typer.Option("--state", envvar=env_name("state_url"), help="Redis URL, redis://host:6379/0")
]
OutOpt = Annotated[Path, typer.Option("--out", help="Output directory (report.json, adapter/, checkpoints/)")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=0, help="torch threads (0: this process's share)")]
TurnsOpt = Annotated[
    int,
    typer.Option(
        "--turns",
        envvar=env_name("turns"),
        min=0,
        help="At most this many services of this host train or evaluate at once (0: no limit); "
        "workers emulating devices on one machine take turns at its cores",
    ),
]
TurnsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--turns-dir",
        envvar=env_name("turns_dir"),
        help="Where the host's turns are kept (every service of the host names the same folder)",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="SECTION.FIELD=VALUE",
        help="Override one field of the configuration, validated as the file is (the value is YAML); "
        "repeatable, e.g. --set rounds.max_rounds=5 --set lora.target_modules=[query,value]",
    ),
]
MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        envvar=env_name("metrics_port"),
        min=1,
        max=65535,
        help="Serve Prometheus metrics at http://0.0.0.0:PORT/metrics (off by default)",
    ),
]


LogFormatOpt = Annotated[
    LogFormat,
    typer.Option(
        "--log-format", envvar=env_name("log_format"), help="text, or json: one JSON object per line"
    ),
]
LogLevelOpt = Annotated[
    LogLevel | None,
    typer.Option(
        "--log-level",
        envvar=env_name("log_level"),
        help="DEBUG, INFO, WARNING or ERROR (default WARNING; INFO with --verbose)",
    ),
]


@dataclass(frozen=True)
class _Ops:
    """What every service command takes besides its own options: logging and metrics."""

    verbose: bool = False
    log_format: LogFormat = "text"
    log_level: LogLevel | None = None
    metrics_port: int | None = None

    def setup_logging(self) -> None:
        configure_logging(self.log_format, self.log_level or ("INFO" if self.verbose else "WARNING"))

    @property
    def progress(self) -> bool:
        """Whether the run's progress goes to the terminal (JSON logs carry it as log lines instead)."""
        return self.log_format == "text"

    def child_args(self) -> list[str]:
        """The logging options of the services a launcher starts (their logs as its own)."""
        level = self.log_level or ("INFO" if self.verbose else "WARNING")
        return ["--log-format", self.log_format, "--log-level", level]


def _load(path: Path, *, distributed: bool | None = True, overrides: list[str] | None = None) -> RunConfig:
    """The run configuration with the ``--set`` ``overrides`` laid over the file, as this command
    deploys it (RunConfig.deployed; None: as the file has it); exit 2 if invalid."""
    try:
        extra: dict[str, Any] = {}
        for assignment in overrides or ():
            extra = merge_overrides(extra, parse_override(assignment))
        config = load_run_config(path, overrides=extra or None)
        return config if distributed is None else config.deployed(distributed=distributed)
    except ConfigError as exc:
        _fail(str(exc))


def _set_args(overrides: list[str] | None) -> list[str]:
    """``--set`` options again, for the services a launcher starts."""
    return [arg for assignment in overrides or () for arg in ("--set", assignment)]


def _key(env: str, *, required: bool) -> bytes | None:
    """A key from the environment (never printed); exit 2 naming the variable when it is required."""
    try:
        key = settings_key(env.removeprefix("LORAFLEET_").lower())
    except ConfigError as exc:
        _fail(str(exc))
    if key is None and required:
        _fail(f"security.require_signatures is set: set {env} or {env}_FILE")
    return key


def _device_key(device_id: str, *, required: bool) -> bytes | None:
    """This device's key: LORAFLEET_DEVICE_KEY, or derived from LORAFLEET_FLEET_KEY (elastic replicas)."""
    own = _key(DEVICE_KEY_ENV, required=False)
    if own is not None:
        return own
    fleet = _key(FLEET_KEY_ENV, required=required)
    return None if fleet is None else derive_device_key(fleet, device_id)


class _StopOnSignals:
    """SIGTERM and SIGINT: before the service loop runs (waiting for the run, a slot, the topology)
    they end the command at once (status 0); once it serves (``serving``) they set ``event``, and the
    loop stops cleanly (a worker hands its task back)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.serving = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.serving:
            raise SystemExit(0)
        self.event.set()


def _reach(*, broker: str | None = None, state: str | None = None) -> None:
    """The servers a command needs, reached within LORAFLEET_CONNECT_TIMEOUT (lorafleet/app/preflight.py)."""
    from lorafleet.app.preflight import check_servers
    from lorafleet.settings import load_settings

    check_servers(broker=broker, state=state, timeout_s=load_settings().connect_timeout)


def _stop_on_signals() -> _StopOnSignals:
    return _StopOnSignals()


@app.command()
def run(
    config: ConfigArg,
    out: OutOpt = Path("runs/latest"),
    broker: Annotated[
        str | None, typer.Option("--broker", help="RabbitMQ URL: run every service as its own process")
    ] = None,
    state: Annotated[str | None, typer.Option("--state", help="Redis URL (with --broker)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-round progress")] = False,
    verbose: VerboseOpt = False,
    log_format: LogFormatOpt = "text",
    log_level: LogLevelOpt = None,
    metrics_port: MetricsPortOpt = None,
    overrides: SetOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run (stopped or interrupted) from its state and OUT's snapshots "
            "(OUT/state/) instead of starting it afresh",
        ),
    ] = False,
) -> None:
    """Run a whole experiment and write OUT/report.json, OUT/report.png and OUT/adapter/."""
    ops = _Ops(verbose, log_format, log_level, metrics_port)
    ops.setup_logging()
    cfg = _load(config, distributed=broker is not None, overrides=overrides)
    set_log_context(run_id=cfg.run_id)
    if (broker is None) != (state is None):
        _fail("--broker and --state go together (distributed mode), or neither (embedded)")
    if broker is not None and state is not None:
        _reach(broker=broker, state=state)
        report = _run_distributed(cfg, config, out, broker, state, ops, _set_args(overrides), resume=resume)
    else:
        report = _run_embedded(cfg, out, quiet=quiet or not ops.progress, ops=ops, resume=resume)
    log.info("final accuracy %s after %s rounds", report.get("final_accuracy"), report.get("final_round"))
    if ops.progress:
        err.print(run_summary(report, out, config, overrides), highlight=False, markup=False, soft_wrap=True)


def _run_embedded(
    cfg: RunConfig, out: Path, *, quiet: bool, ops: _Ops, resume: bool = False
) -> dict[str, Any]:
    """``run`` in this process (lorafleet/app/embedded.py), its metrics and log rounds from its state."""
    from lorafleet.app.embedded import run_embedded
    from lorafleet.state.memory import InMemoryStateStore

    store = InMemoryStateStore()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(RoundFollower(store, cfg.run_id).start().stop)
        if ops.metrics_port is not None:
            cleanup.enter_context(_run_metrics(ops.metrics_port, cfg, store, None))
        try:
            return run_embedded(cfg, out, quiet=quiet, state=store, resume=resume)
        except KeyboardInterrupt:
            _fail(f"interrupted: the report so far is in {out / 'report.json'}; --resume goes on", code=130)


def _run_distributed(
    cfg: RunConfig,
    config: Path,
    out: Path,
    broker: str,
    state: str,
    ops: _Ops,
    set_args: list[str],
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """``run --broker --state``: the launcher (lorafleet/app/launcher.py), with the run's metrics
    served from this process when ``ops.metrics_port`` is set."""
    from lorafleet.app.connections import open_state, open_transport
    from lorafleet.app.launcher import run_distributed

    with contextlib.ExitStack() as cleanup:
        if ops.metrics_port is not None:
            store, transport = open_state(state), open_transport(broker)
            cleanup.callback(store.close)
            cleanup.callback(transport.close)
            cleanup.enter_context(_run_metrics(ops.metrics_port, cfg, store, transport))
        args = [*ops.child_args(), *set_args]
        return run_distributed(
            cfg, config, out, broker=broker, state=state, service_args=args, fresh=not resume
        )


class _Service(Protocol):
    def start(self) -> None: ...

    def run_forever(self, stop: threading.Event) -> None: ...


def _serve(
    config: Path,
    broker: str,
    state: str,
    threads: int,
    ops: _Ops,
    overrides: list[str] | None,
    build: Callable[[RunConfig, Transport, StateStore, AdapterRuntime], _Service],
) -> None:
    """Run one service over RabbitMQ and Redis until its run ends or a signal stops it."""
    ops.setup_logging()
    cfg = _load(config, overrides=overrides)
    set_log_context(run_id=cfg.run_id)
    _reach(broker=broker, state=state)
    from lorafleet.app.connections import open_state, open_transport
    from lorafleet.app.wiring import build_runtime
    from lorafleet.ml.model import configure_torch_threads

    configure_torch_threads(threads)
    stop = _stop_on_signals()
    transport, store = open_transport(broker), open_state(state)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(store.close)
        cleanup.callback(transport.close)
        cleanup.callback(RoundFollower(store, cfg.run_id).start().stop)
        if ops.metrics_port is not None:
            cleanup.enter_context(_run_metrics(ops.metrics_port, cfg, store, transport))
        service = build(cfg, transport, store, build_runtime(cfg))
        service.start()
        stop.serving = True
        service.run_forever(stop.event)


@contextlib.contextmanager
def _run_metrics(port: int, cfg: RunConfig, store: StateStore, transport: Transport | None) -> Iterator[None]:
    """The run's metrics from ``store`` (and the dead-letter queue's depth, with ``transport``) on
    ``port`` while the block runs."""
    from lorafleet.app.metrics_server import DeadLetterDepth, metrics_registry
    from lorafleet.run.metrics import RunCollector

    depth = None if transport is None else DeadLetterDepth(transport)
    collector = RunCollector(store, cfg.run_id, hierarchical=cfg.hierarchical, dead_letters=depth)
    server = _metrics_server(port, metrics_registry(collector))
    try:
        yield
    finally:
        server.close()
        if depth is not None:
            depth.close()


def _metrics_server(port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` on ``port``; exit 2 naming the port when it cannot be bound."""
    from lorafleet.app.metrics_server import MetricsServer

    try:
        return MetricsServer(port, registry)
    except OSError as exc:
        _fail(f"--metrics-port {port}: {exc.strerror or exc}")


@app.command()
def orchestrator(
    config: ConfigArg,
    broker: BrokerOpt,
    state: StateOpt,
    out: OutOpt = Path("runs/latest"),
    threads: ThreadsOpt = 1,
    verbose: VerboseOpt = False,
    log_format: LogFormatOpt = "text",
    log_level: LogLevelOpt = None,
    metrics_port: MetricsPortOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Run the orchestrator service against RabbitMQ and Redis."""

    def build(cfg: RunConfig, transport: Transport, store: StateStore, runtime: AdapterRuntime) -> _Service:
        from lorafleet.app.wiring import build_orchestrator
        from lorafleet.run.progress import RunReporter

        reporter = RunReporter(cfg, quiet=log_format != "text", state=store)
        return build_orchestrator(cfg, transport, store, runtime, out_dir=out, reporter=reporter)

    ops = _Ops(verbose, log_format, log_level, metrics_port)
    _serve(config, broker, state, threads, ops, overrides, build)


@app.command()
def aggregator(
    config: ConfigArg,
    broker: BrokerOpt,
    state: StateOpt,
    out: OutOpt = Path("runs/latest"),
    threads: ThreadsOpt = 0,
    turns: TurnsOpt = 0,
    turns_dir: TurnsDirOpt = None,
    verbose: VerboseOpt = False,
    log_format: LogFormatOpt = "text",
    log_level: LogLevelOpt = None,
    metrics_port: MetricsPortOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Run the aggregator service against RabbitMQ and Redis."""
    host_turns = _host_turns(turns, turns_dir)

    def build(cfg: RunConfig, transport: Transport, store: StateStore, runtime: AdapterRuntime) -> _Service:
        from lorafleet.app.wiring import build_aggregator

        fleet_key = _key(FLEET_KEY_ENV, required=bool(cfg.security.require_signatures))
        return build_aggregator(
            cfg, transport, store, runtime, out_dir=out, fleet_key=fleet_key, turns=host_turns
        )

    ops = _Ops(verbose, log_format, log_level, metrics_port)
    _serve(config, broker, state, threads, ops, overrides, build)


@app.command()
def worker(
    config: ConfigArg,
    broker: BrokerOpt,
    device_id: Annotated[
        str | None,
        typer.Option(
            "--device-id",
            envvar=env_name("device_id"),
            help="The device slot to serve, e.g. dev-0003; without it the worker claims a free slot",
        ),
    ] = None,
    claim_timeout: Annotated[
        float, typer.Option("--claim-timeout", min=1.0, help="Seconds to wait for a free slot")
    ] = 600.0,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            envvar=env_name("device_data"),
            help="This device's own training rows (data.source: local): JSONL, CSV/TSV, Parquet or a "
            "save_to_disk folder; only their count and, as privacy allows, a label histogram leave it",
        ),
    ] = None,
    threads: ThreadsOpt = 0,
    turns: TurnsOpt = 0,
    turns_dir: TurnsDirOpt = None,
    verbose: VerboseOpt = False,
    log_format: LogFormatOpt = "text",
    log_level: LogLevelOpt = None,
    metrics_port: MetricsPortOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Run one device (worker) against RabbitMQ. It needs no state-store access."""
    _Ops(verbose, log_format, log_level).setup_logging()
    cfg = _load(config, overrides=overrides)
    set_log_context(run_id=cfg.run_id, device_id=device_id)
    if cfg.data.source != "local":  # a device's own rows are checked first, before any connection
        _reach(broker=broker)
    from lorafleet.app.connections import open_transport
    from lorafleet.app.wiring import Shards, build_runtime, build_worker, device_index
    from lorafleet.ml.model import configure_torch_threads

    try:  # the device's data first: bad data ends the worker before it touches the broker
        shards = Shards.load(cfg, data)
    except LorafleetError as exc:
        _fail(str(exc))
    host_turns = _host_turns(turns, turns_dir)
    if cfg.data.source == "local":
        _reach(broker=broker)
    configure_torch_threads(threads)
    stop = _stop_on_signals()
    transport = open_transport(broker)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(transport.close)
        observed = None if metrics_port is None else _worker_metrics(metrics_port, cfg, cleanup)
        lease = None
        if device_id is None:
            lease = _claim(transport, cfg, claim_timeout)
            cleanup.callback(lease.release)  # no-op after retire; else the slot is free for a replacement
            device_id = lease.device_id
            set_log_context(device_id=device_id)
        try:
            index = device_index(cfg, device_id)
        except ConfigError as exc:
            _fail(f"--device-id: {exc}")
        service = build_worker(
            cfg,
            index,
            transport,
            build_runtime(cfg),
            shards,
            on_finished=None if lease is None else lease.retire,
            signing_key=_device_key(device_id, required=bool(cfg.security.require_signatures)),
            wrap_trainer=None if observed is None else observed.wrap,
            own_process=True,
            turns=host_turns,
        )
        if observed is not None:
            observed.collector.service = service
        service.start()
        log.info("worker %s: serving run %s", device_id, cfg.run_id)
        stop.serving = True
        service.run_forever(stop.event, heartbeat_s=cfg.rounds.heartbeat_s)
    if service.training_abandoned:  # its task went back to the queue; torch cannot be shut down mid-step
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _host_turns(count: int, directory: Path | None) -> HostTurns | None:
    """The host's ``count`` turns (worker/host_turns.py); None for 0 (no limit). Exits 2 when the
    folder cannot be made."""
    if count == 0:
        return None
    from worker.host_turns import DEFAULT_TURNS_DIR, HostTurns

    try:
        return HostTurns(directory or DEFAULT_TURNS_DIR, count)
    except ConfigError as exc:
        _fail(f"--turns-dir: {exc}")


def _claim(transport: Transport, cfg: RunConfig, timeout_s: float) -> SlotLease:
    """A free device slot of the run, held for this worker's lifetime; exit 3 when none frees up."""
    from worker.slots import claim_slot

    try:
        lease = claim_slot(transport, cfg.run_id, timeout_s=timeout_s)
    except NoFreeSlot as exc:
        _fail(str(exc), code=3)
    lease.keep(transport, cfg.run_id)  # its own slot again after a lost connection
    return lease


def _worker_metrics(port: int, cfg: RunConfig, cleanup: contextlib.ExitStack) -> WorkerObserver:
    """This worker's process-local metrics on ``port`` until ``cleanup`` closes."""
    from lorafleet.app.metrics_server import metrics_registry
    from lorafleet.app.worker_metrics import WorkerObserver

    registry = metrics_registry()
    observer = WorkerObserver(registry, cfg.run_id)
    cleanup.callback(_metrics_server(port, registry).close)
    return observer


@app.command()
def dlq(
    broker: BrokerOpt,
    purge: Annotated[bool, typer.Option("--purge", help="Remove the messages after listing them")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many messages")] = 100_000,
) -> None:
    """List and count the dead-letter queue by reason (messages stay unless --purge)."""
    import json as _json

    from rich.table import Table

    _reach(broker=broker)
    from lorafleet.app.connections import open_transport
    from lorafleet.app.dlq import count_by_reason, inspect_dead_letters

    transport = open_transport(broker)
    try:
        letters = inspect_dead_letters(transport, purge=purge, limit=limit)
    finally:
        transport.close()
    counts = count_by_reason(letters)
    if as_json:
        typer.echo(
            _json.dumps(
                {
                    "total": len(letters),
                    "by_reason": counts,
                    "purged": purge,
                    "messages": [vars(x) for x in letters],
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"lf.dead: {len(letters)} message(s){' (purged)' if purge else ''}")
    for column in ("reason", "count"):
        table.add_column(column)
    for reason, count in counts.items():
        table.add_row(reason, str(count))
    Console().print(table)
    for letter in letters[:50]:
        Console().print(
            f"  {letter.reason:<16} {letter.queue:<18} {letter.message_id[:60]:<60} {letter.detail[:80]}",
            highlight=False,
            markup=False,
        )


@app.command()
def status(
    state: StateOpt,
    run_id: Annotated[str, typer.Option("--run", envvar=env_name("run_id"), help="The run's run_id")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show a run's state: round, devices, open rounds, counters, and group/global aggregation counts."""
    import json as _json

    from rich.table import Table

    _reach(state=state)
    from lorafleet.app.connections import open_state
    from lorafleet.app.status import run_status
    from lorafleet.state.base import StateStoreError

    try:
        store = open_state(state)
    except ConfigError as exc:
        _fail(str(exc))
    try:
        snapshot = run_status(store, run_id)
    except (LookupError, StateStoreError) as exc:
        _fail(str(exc), code=1)
    finally:
        store.close()
    if as_json:
        typer.echo(_json.dumps(snapshot, indent=2))
        return
    console = Console()
    console.print(
        f"[bold]{run_id}[/bold] ({snapshot['strategy']}): {snapshot['status']}, round {snapshot['round']}"
        f"/{snapshot['max_rounds']}, {snapshot['devices_registered']} devices "
        f"({snapshot['devices_lease_expired']} with an expired lease)",
        highlight=False,
    )
    hierarchy = snapshot.get("hierarchy")
    if hierarchy:
        table = Table(title=f"global aggregations: {hierarchy['global_aggregations']}")
        for column in ("global round", "status", "group", "count", "target"):
            table.add_column(column)
        for entry in hierarchy["global_rounds"][-5:]:
            for group, target in entry["targets"].items():
                table.add_row(
                    str(entry["global_round"]),
                    entry["status"],
                    group,
                    str(entry["counts"][group]),
                    str(target),
                )
        console.print(table)
    for entry in snapshot["open_rounds"]:
        console.print(
            f"  round {entry['round']} {entry['status']}: {entry['reported']}/{entry['tasks']} reported "
            f"(quorum {entry['quorum']})",
            highlight=False,
        )
    console.print(f"  counters: {snapshot['counters']}", highlight=False)


@app.command()
def stop(
    run_id: Annotated[str, typer.Argument(help="The run to stop (its run_id)")],
    state: StateOpt,
) -> None:
    """Finish a distributed run after its current round (reason 'stopped'; report and adapter written).

    'lorafleet run CONFIG --resume' takes it up again.
    """
    _reach(state=state)
    from lorafleet.app.connections import open_state
    from lorafleet.run.stopping import request_stop

    store = open_state(state)
    try:
        status = request_stop(store, run_id)
    except LookupError as exc:
        _fail(str(exc), code=1)
    finally:
        store.close()
    if status == "finished":
        typer.echo(f"{run_id}: already finished")
    else:
        typer.echo(f"{run_id}: stop requested; it finishes after its current round")


@app.command(name="restore")
def restore_command(
    run_id: Annotated[str, typer.Argument(help="The run to restore (its run_id)")],
    out: Annotated[Path, typer.Option("--out", help="The aggregator's output directory (state/ snapshots)")],
    state: StateOpt,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace the run even though the store still holds it (rolls it back)"),
    ] = False,
) -> None:
    """Put a run the state store lost back from the aggregator's latest snapshot of it.

    For a store whose services may not do it themselves (Redis ACL users kept to their own keys):
    run it as a user that may write every key of the run (lf-admin), then start the services again.
    A run the store still holds is left alone (restoring it would roll it back) unless --force.
    """
    _reach(state=state)
    from lorafleet.app.connections import open_state
    from lorafleet.run.epoch import EPOCH_FIELD
    from lorafleet.run.recovery import latest_snapshot, restore

    snapshot = latest_snapshot(out, run_id)
    if snapshot is None:
        _fail(f"no snapshot of run {run_id!r} in {out / 'state'}", code=1)
    store = open_state(state)
    try:
        held = store.get_run_fields(run_id)
        if EPOCH_FIELD in held and not force:
            _fail(
                f"run {run_id!r} is still in the state store (epoch {held[EPOCH_FIELD]}): restoring its "
                f"snapshot of round {snapshot.round_no} would roll it back; nothing was changed "
                "(--force replaces it)",
                code=1,
            )
        restore(store, snapshot, out)
    except LorafleetError as exc:
        _fail(str(exc), code=1)
    finally:
        store.close()
    typer.echo(f"{run_id}: restored from its snapshot after round {snapshot.round_no} ({snapshot.epoch})")


@app.command(name="runs")
def runs_command(
    state: StateOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List the runs a state store holds: status, round, accuracy."""
    import json as _json

    from rich.table import Table

    _reach(state=state)
    from lorafleet.app.connections import open_state
    from lorafleet.app.runs import list_runs

    store = open_state(state)
    try:
        rows = list_runs(store)
    finally:
        store.close()
    if as_json:
        typer.echo(_json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} run(s)")
    for column in ("run", "status", "strategy", "round", "finish", "accuracy"):
        table.add_column(column)
    for row in rows:
        accuracy = row["accuracy"]
        table.add_row(
            row["run_id"],
            str(row["status"]),
            str(row["strategy"]),
            f"{row['round']}/{row['max_rounds']}",
            str(row["finish_reason"] or ""),
            "" if accuracy is None else f"{accuracy:.4f}",
        )
    Console().print(table)


@app.command(name="device-key")
def device_key(
    device_id: Annotated[str, typer.Argument(help="The device to provision, e.g. dev-0003")],
) -> None:
    """Print a device's own signing key (hex), derived from LORAFLEET_FLEET_KEY, for provisioning it."""
    fleet = _key(FLEET_KEY_ENV, required=True)
    assert fleet is not None
    typer.echo(derive_device_key(fleet, device_id).hex())


@app.command()
def validate(
    config: ConfigArg,
    overrides: SetOpt = None,
    model: Annotated[
        bool,
        typer.Option(
            "--model/--no-model",
            help="Also check what depends on the model: LoRA layers and target modules, max_seq_len "
            "(--no-model: the file alone, e.g. where the model's folder is not at hand)",
        ),
    ] = True,
) -> None:
    """Check a run configuration (also against the model, without its weights) and print it in full.

    The configuration is printed with every default filled in; then what depends on the model is
    checked against its blocks, projections and positions.
    """
    cfg = _load(config, distributed=None, overrides=overrides)
    Console().print_json(cfg.model_dump_json())
    if not model:
        return
    from lorafleet.app.model_checks import check_model

    shape, findings = check_model(cfg)
    if shape is not None:
        a = shape.architecture
        err.print(
            f"model: {a.model_type}, {a.num_blocks} blocks ({a.blocks_path}), projections "
            f"{', '.join(a.projections)}; LoRA targets by default: {', '.join(a.default_targets)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    for finding in findings:
        kind = "error" if finding.error else "note"
        line = f"{kind}: {finding.field}: {finding.message}"
        err.print(line, highlight=False, markup=False, soft_wrap=True)
    if any(f.error for f in findings):
        raise typer.Exit(2)


app.command()(adapter_commands.predict)
app.command()(adapter_commands.merge)
app.add_typer(data_commands.data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"lorafleet {__version__}")
        raise typer.Exit()


@app.callback()
def _lorafleet(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit"),
    ] = False,
) -> None:
    """Options before any command."""


def main() -> None:
    """The ``lorafleet`` entry point: a LorafleetError ends the command in one line, not a traceback."""
    try:
        app()
    except LorafleetError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
