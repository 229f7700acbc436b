"""The real broker's throughput: lorafleet's PikaTransport against raw pika, on the same RabbitMQ.

Both sides move the same ~300 KB ``LoraUpdate`` envelope (the quickstart's update: rank-8 LoRA on
query/value of all 6 MiniLM blocks plus the classifier head, float32, encoded with
``schemas.tensors.encode_tensors`` and ``schemas.envelope.encode``) through a quorum queue with
publisher confirms and mandatory publishes, from 8 publisher processes, to 1 consumer that acks
every delivery (prefetch 8, the aggregator's):

* **lorafleet**: ``PikaTransport.publish`` to ``lf.updates`` under ``update.<device>``, into the queue
  ``lorafleet.transport.topology`` declares (``declare_static_topology``); the consumer is
  ``PikaTransport.subscribe(lf.updates)``: ``get`` then ``ack`` on the service thread, the ack
  marshalled to the subscription's I/O thread.
* **raw pika**: one ``BlockingConnection`` per publisher, ``confirm_delivery()``, ``basic_publish(...,
  mandatory=True)`` with the same properties (persistent, content type, message id); one consumer
  ``basic_qos(prefetch_count=8)``, ``basic_ack`` in its callback; an equivalent quorum queue (the same
  x-arguments, written out here) on its own topic exchange.

Each side runs ``--reps`` times, alternating (L R, R L, L R, ...: drift in the host's load falls on
both), after one short warm-up each. A run's rate is updates acked by the consumer over the seconds
from the publishers' common start (a barrier, after every connection is open) to the last ack. Each
publisher times every ``publish`` call (which returns at the broker's confirm); the consumer times
its wait in ``get`` and its ``ack``. ``--profile`` adds one cProfile'd run per side (publisher 0 and
the consumer's thread), reported as the top functions by cumulative time.

Everything happens on a throwaway vhost (``rabbitmqctl add_vhost`` / ``set_permissions`` /
``delete_vhost``). The machine is shared: before every run the harness waits (briefly) for the other
processes to be quiet (``calibrate.QuietRunner``), and records for every run the cores used by the
broker (``beam.smp``), the publishers, this process and everything else (other people's work).

    .venv/bin/python benchmarks/broker_throughput.py

Writes ``benchmarks/results/broker_throughput.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import multiprocessing as mp
import os
import pstats
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.calibrate import QuietRunner  # noqa: E402
from benchmarks.harness import write_json  # noqa: E402
from benchmarks.provenance import provenance  # noqa: E402
from lorafleet.transport.rabbitmq import CONTENT_TYPE, PikaTransport  # noqa: E402
from lorafleet.transport.topology import (  # noqa: E402
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DELIVERY_LIMIT,
    UPDATES_EXCHANGE,
    UPDATES_QUEUE,
    declare_static_topology,
    update_key,
)

COMMAND = ".venv/bin/python benchmarks/broker_throughput.py"
RESULTS = Path(__file__).parent / "results"
SIDES = ("lorafleet", "raw")
LABELS = {"lorafleet": "lorafleet PikaTransport", "raw": "raw pika"}
#: the raw side's names: its own exchange, DLX and quorum queue, declared like lf.updates
RAW_EXCHANGE = "bench.raw.updates"
RAW_DLX = "bench.raw.dlx"
RAW_QUEUE = "bench.raw.updates"
RAW_QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-dead-letter-exchange": RAW_DLX,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
    "x-delivery-limit": DELIVERY_LIMIT,
}
#: a consumer that gets nothing for this long fails the run
STALL_S = 60.0
HIDDEN, RANK, BLOCKS, LABEL_COUNT = 384, 8, 6, 2


# -- the message -----------------------------------------------------------------------------------
def build_update() -> tuple[bytes, dict[str, Any]]:
    """The envelope of a quickstart-sized LoraUpdate, and what it holds (sizes, encode times)."""
    import torch

    from schemas.envelope import encode
    from schemas.messages import LoraUpdate, TrainMetrics
    from schemas.tensors import encode_tensors

    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for block in range(BLOCKS):
        for module in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{block}.attention.self.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=generator)
    tensors["base_model.model.classifier.modules_to_save.default.weight"] = torch.randn(
        LABEL_COUNT, HIDDEN, generator=generator
    )
    tensors["base_model.model.classifier.modules_to_save.default.bias"] = torch.zeros(LABEL_COUNT)

    def make() -> bytes:
        update = LoraUpdate(
            task_id="bench:1:dev-0000",
            run_id="bench",
            round=1,
            device_id="dev-0000",
            plan_version=1,
            num_samples=100,
            adapter=encode_tensors(tensors),
            metrics=TrainMetrics(train_loss=0.5, steps=10, examples=100, compute_s=1.0),
        )
        return encode(update)

    body = make()
    times = []
    for _ in range(30):
        started = time.perf_counter()
        make()
        times.append(time.perf_counter() - started)
    return body, {
        "envelope_bytes": len(body),
        "tensors": len(tensors),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "encode_ms_median": round(statistics.median(times) * 1e3, 3),
        "encode_note": "encode_tensors + envelope.encode of one update, timed here; both sides publish "
        "the pre-encoded bytes, so encoding is not in the rates",
    }


# -- the broker ------------------------------------------------------------------------------------
def _rabbitmqctl(*args: str, attempts: int = 12) -> None:
    """``rabbitmqctl -q ARGS``, retried every 5 s while the shared broker's app is down (restarting)."""
    for attempt in range(1, attempts + 1):
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            return
        if attempt == attempts:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()[:300]}")
        time.sleep(5)


@contextlib.contextmanager
def throwaway_vhost(host: str, port: int) -> Iterator[str]:
    """An AMQP URL (guest) on a fresh vhost, deleted afterwards."""
    vhost = f"lf-bench-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{host}:{port}/{vhost}"
    finally:
        # retried: the shared broker may be restarting (another user's stop_app/start_app) just then
        for _ in range(12):
            done = subprocess.run(
                ["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=120
            )
            if done.returncode == 0:
                break
            time.sleep(5)
        else:
            print(f"could not delete vhost {vhost}: rabbitmqctl -q delete_vhost {vhost}", file=sys.stderr)


def wait_for_broker(url: str, timeout_s: float = 90.0) -> None:
    """Until the vhost takes connections again (after a broker restart)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pika.BlockingConnection(pika.URLParameters(url)).close()
            return
        except pika.exceptions.AMQPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def declare_raw(url: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.exchange_declare(RAW_EXCHANGE, exchange_type="topic", durable=True)
        channel.exchange_declare(RAW_DLX, exchange_type="topic", durable=True)
        channel.queue_declare(RAW_QUEUE, durable=True, arguments=RAW_QUEUE_ARGUMENTS)
        channel.queue_bind(RAW_QUEUE, RAW_EXCHANGE, routing_key="update.#")
    finally:
        connection.close()


def purge(url: str) -> dict[str, int]:
    """Empty both queues (nothing should be left) and lf.dead (the warm-up publishes); returns what was
    left in each."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        queues = (UPDATES_QUEUE, RAW_QUEUE, DEAD_LETTER_QUEUE)
        return {q: int(channel.queue_purge(q).method.message_count) for q in queues}
    finally:
        connection.close()


def _beam_pid() -> int | None:
    """The RabbitMQ node's process (read-only: its CPU time is recorded, nothing else)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
    return None


def _proc_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_busy_s() -> tuple[float, float]:
    """CPU seconds the machine was busy (idle and iowait excluded), and of those in irq + softirq
    (loopback networking is mostly softirq, charged to no process)."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(x) for x in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - values[3] - values[4]) / tick, (values[5] + values[6]) / tick


# -- publishers (separate processes) ---------------------------------------------------------------
def _summary_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 3),
    }


def _profile_text(profiler: cProfile.Profile, top: int = 18) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    lines = [line.rstrip() for line in out.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[max(0, start - 1) :])


#: (file suffix, function) of the calls whose cumulative time the profiles report per call
WATCHED = {
    "send": ("benchmarks/broker_throughput.py", "send"),
    "lorafleet.publish": ("lorafleet/transport/rabbitmq.py", "publish"),
    "pika.basic_publish": ("pika/adapters/blocking_connection.py", "basic_publish"),
    "lorafleet.get": ("lorafleet/transport/rabbitmq.py", "get"),
    "lorafleet.ack": ("lorafleet/transport/rabbitmq.py", "ack"),
    "pika.basic_ack": ("pika/adapters/blocking_connection.py", "basic_ack"),
    "pika.process_data_events": ("pika/adapters/blocking_connection.py", "process_data_events"),
}


def _profile_calls(profiler: cProfile.Profile) -> dict[str, dict[str, float]]:
    """Calls and cumulative ms per call of the ``WATCHED`` functions (those the profile saw)."""
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    out: dict[str, dict[str, float]] = {}
    for (filename, _line, function), (_cc, calls, _tt, cumulative, _callers) in stats.items():
        for name, (suffix, wanted) in WATCHED.items():
            if function == wanted and filename.endswith(suffix) and calls:
                out[name] = {"calls": calls, "cum_ms_per_call": round(cumulative / calls * 1e3, 4)}
    return out


def _profile(profiler: cProfile.Profile | None) -> dict[str, Any] | None:
    if profiler is None:
        return None
    return {"calls": _profile_calls(profiler), "top": _profile_text(profiler)}


def _publish_run(
    side: str, url: str, index: int, count: int, body: bytes, profile: bool, barrier: Barrier
) -> dict[str, Any]:
    device = f"dev-{index:04d}"
    key = update_key(device)
    send: Callable[[int], None]
    if side == "lorafleet":
        transport = PikaTransport(url)
        # open this thread's connection and its confirm channel before the clock starts, as the raw
        # side does: one message to the dead-letter exchange (its queue, lf.dead, is purged after a run)
        transport.publish(DEAD_LETTER_EXCHANGE, "warmup", b"", message_id=f"warmup:{device}")

        def send(i: int) -> None:
            transport.publish(UPDATES_EXCHANGE, key, body, message_id=f"update:bench:{device}:{i}")

        close: Callable[[], None] = transport.close
    else:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.confirm_delivery()

        def send(i: int) -> None:
            properties = pika.BasicProperties(
                content_type=CONTENT_TYPE,
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=f"update:bench:{device}:{i}",
                headers={},
            )
            channel.basic_publish(RAW_EXCHANGE, key, body, properties, mandatory=True)

        close = connection.close
    profiler = cProfile.Profile() if profile else None
    latencies: list[float] = []
    barrier.wait(timeout=120)
    cpu0, start = time.process_time(), time.monotonic()
    if profiler is not None:
        profiler.enable()
    for i in range(count):
        t = time.perf_counter()
        send(i)
        latencies.append(time.perf_counter() - t)
    if profiler is not None:
        profiler.disable()
    end, cpu = time.monotonic(), time.process_time() - cpu0
    close()
    return {
        "start": start,
        "end": end,
        "count": count,
        "cpu_s": cpu,
        "latencies": latencies,
        "profile": _profile(profiler),
    }


def _publisher_main(index: int, barrier: Barrier, jobs: Connection) -> None:
    while True:
        job = jobs.recv()
        if job is None:
            return
        try:
            jobs.send(
                _publish_run(
                    job["side"], job["url"], index, job["count"], job["body"], job["profile"], barrier
                )
            )
        except Exception as exc:  # reported to the parent, which fails the run
            barrier.abort()
            jobs.send({"error": f"{type(exc).__name__}: {exc}"})


class Publishers:
    """A pool of publisher processes started once (fork, before any connection or thread exists)."""

    def __init__(self, count: int) -> None:
        context = mp.get_context("fork")
        self.barrier: Barrier = context.Barrier(count + 1)
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        for index in range(count):
            parent, child = context.Pipe()
            process = context.Process(target=_publisher_main, args=(index, self.barrier, child), daemon=True)
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def start(self, side: str, url: str, total: int, body: bytes, profile: bool) -> None:
        share, extra = divmod(total, len(self.pipes))
        for index, pipe in enumerate(self.pipes):
            pipe.send(
                {
                    "side": side,
                    "url": url,
                    "count": share + (index < extra),
                    "body": body,
                    "profile": profile and index == 0,
                }
            )

    def results(self) -> list[dict[str, Any]]:
        out = [pipe.recv() for pipe in self.pipes]
        errors = [r["error"] for r in out if "error" in r]
        if errors:
            raise RuntimeError(f"publisher failed: {errors[0]}")
        return out

    def cpu_s(self) -> float:
        return sum(_proc_cpu_s(p.pid) for p in self.processes)

    def recover(self, timeout_s: float = 150.0) -> None:
        """After a failed run: collect whatever each publisher still reports, reset the barrier."""
        deadline = time.monotonic() + timeout_s
        for pipe in self.pipes:
            if pipe.poll(max(0.0, deadline - time.monotonic())):
                pipe.recv()
        self.barrier.reset()

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(timeout=10)


# -- consumers (this process) ----------------------------------------------------------------------
def consume_lorafleet(url: str, total: int, prefetch: int, barrier: Barrier, profile: bool) -> dict[str, Any]:
    transport = PikaTransport(url)
    subscription = transport.subscribe(UPDATES_QUEUE, prefetch=prefetch)
    waits: list[float] = []
    acks: list[float] = []
    profiler = cProfile.Profile() if profile else None
    barrier.wait(timeout=120)
    start = time.monotonic()
    if profiler is not None:
        profiler.enable()
    try:
        for _ in range(total):
            t0 = time.perf_counter()
            delivery = subscription.get(timeout=STALL_S)
            t1 = time.perf_counter()
            if delivery is None:
                raise RuntimeError(f"lorafleet consumer: nothing for {STALL_S}s after {len(acks)} updates")
            delivery.ack()
            waits.append(t1 - t0)
            acks.append(time.perf_counter() - t1)
        end = time.monotonic()
    finally:
        if profiler is not None:
            profiler.disable()
        subscription.close()
        transport.close()
    return _consumer_result(start, end, waits, acks, profiler)


def consume_raw(url: str, total: int, prefetch: int, barrier: Barrier, profile: bool) -> dict[str, Any]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    acks: list[float] = []
    arrivals: list[float] = []

    def on_message(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
        t = time.perf_counter()
        arrivals.append(t)
        ch.basic_ack(method.delivery_tag)
        acks.append(time.perf_counter() - t)

    channel.basic_consume(RAW_QUEUE, on_message, auto_ack=False)
    profiler = cProfile.Profile() if profile else None
    barrier.wait(timeout=120)
    start = time.monotonic()
    if profiler is not None:
        profiler.enable()
    try:
        last, seen = time.monotonic(), 0
        while len(acks) < total:
            connection.process_data_events(time_limit=1.0)
            if len(acks) != seen:
                last, seen = time.monotonic(), len(acks)
            elif time.monotonic() - last > STALL_S:
                raise RuntimeError(f"raw consumer: nothing for {STALL_S}s after {seen} updates")
        end = time.monotonic()
    finally:
        if profiler is not None:
            profiler.disable()
        if connection.is_open:
            connection.close()
    # the time between two deliveries' callbacks stands for lorafleet's wait in get()
    waits = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return _consumer_result(start, end, waits, acks, profiler)


def _consumer_result(
    start: float, end: float, waits: list[float], acks: list[float], profiler: cProfile.Profile | None
) -> dict[str, Any]:
    return {
        "start": start,
        "end": end,
        "wait": _summary_ms(waits) if waits else None,
        "ack": _summary_ms(acks),
        "profile": _profile(profiler),
    }


# -- one run ---------------------------------------------------------------------------------------
def run_once(
    side: str, url: str, total: int, body: bytes, publishers: Publishers, prefetch: int, profile: bool = False
) -> dict[str, Any]:
    beam = _beam_pid()
    consume = consume_lorafleet if side == "lorafleet" else consume_raw
    # an idle connection that outlives the run only if the broker did not restart meanwhile (lorafleet's
    # side would reconnect and go on, slower, instead of failing)
    sentinel = pika.BlockingConnection(pika.URLParameters(url))
    try:
        publishers.start(side, url, total, body, profile)
        cpu = (_machine_busy_s(), _proc_cpu_s(beam), publishers.cpu_s(), time.process_time())
        consumer = consume(url, total, prefetch, publishers.barrier, profile)
        sentinel.process_data_events(time_limit=0)
    except pika.exceptions.AMQPError as exc:
        raise RuntimeError(f"the broker connection was lost during the run ({exc!r})") from exc
    finally:
        if sentinel.is_open:
            sentinel.close()
    busy_now = _machine_busy_s()
    busy, irq, broker, pubs, own = (
        busy_now[0] - cpu[0][0],
        busy_now[1] - cpu[0][1],
        _proc_cpu_s(beam) - cpu[1],
        publishers.cpu_s() - cpu[2],
        time.process_time() - cpu[3],
    )
    sent = publishers.results()
    wall = consumer["end"] - consumer["start"]
    publish_wall = max(r["end"] for r in sent) - min(r["start"] for r in sent)
    latencies = [x for r in sent for x in r["latencies"]]
    left = purge(url)
    return {
        "side": side,
        "updates": total,
        "seconds": round(wall, 3),
        "updates_per_s": round(total / wall, 1),
        "MB_per_s": round(total * len(body) / wall / 1e6, 1),
        "publish_updates_per_s": round(total / publish_wall, 1),
        "publish_latency": _summary_ms(latencies),
        "publisher_cpu_s_per_update_ms": round(sum(r["cpu_s"] for r in sent) / total * 1e3, 3),
        "consumer_wait": consumer["wait"],
        "consumer_ack": consumer["ack"],
        # cores over the run (includes connect/teardown moments at its edges): the broker, the
        # publisher processes, this process (the consumer), irq + softirq (loopback TCP), and everything
        # else: other people's work, and kernel threads (the quorum queue's disk writeback)
        "cores": {
            "broker": round(broker / wall, 2),
            "publishers": round(pubs / wall, 2),
            "consumer": round(own / wall, 2),
            "kernel_irq": round(irq / wall, 2),
            "others": round(max(0.0, busy - irq - broker - pubs - own) / wall, 2),
        },
        "left_in_queues": left,
        "profile": {"publisher_0": sent[0]["profile"], "consumer": consumer["profile"]} if profile else None,
    }


def run_retrying(
    quiet: QuietRunner,
    name: str,
    unit: Callable[[], dict[str, Any]],
    url: str,
    publishers: Publishers,
    failures: list[dict[str, Any]],
    attempts: int = 3,
) -> dict[str, Any]:
    """One measured run; a run that fails (the shared broker restarted, say) is recorded and redone."""
    for attempt in range(1, attempts + 1):
        try:
            return quiet.run(name, unit)
        except Exception as exc:
            if attempt == attempts:
                raise
            failures.append({"run": name, "attempt": attempt, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{name} failed ({type(exc).__name__}: {exc}); redoing it", file=sys.stderr, flush=True)
            publishers.recover()
            wait_for_broker(url)
            purge(url)
    raise AssertionError("unreachable")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["updates_per_s"] for r in runs]
    median = statistics.median(rates)
    return {
        "updates_per_s": rates,
        "median_updates_per_s": round(median, 1),
        "min": min(rates),
        "max": max(rates),
        "spread_pct": round((max(rates) - min(rates)) / median * 100, 1),
        "median_MB_per_s": round(statistics.median(r["MB_per_s"] for r in runs), 1),
        "publish_latency_median_ms": statistics.median(r["publish_latency"]["median_ms"] for r in runs),
        "consumer_ack_median_ms": statistics.median(r["consumer_ack"]["median_ms"] for r in runs),
        "broker_cores_median": statistics.median(r["cores"]["broker"] for r in runs),
        "others_cores_median": statistics.median(r["cores"]["others"] for r in runs),
    }


# -- output ----------------------------------------------------------------------------------------
def markdown(data: dict[str, Any]) -> str:
    s, setup, prov = data["summary"], data["setup"], data["provenance"]
    lines = [
        "# Broker throughput: lorafleet's PikaTransport vs raw pika",
        "",
        f"`{prov['command']}` on {prov['date']}; RabbitMQ {setup['rabbitmq']}, pika {setup['pika']}, "
        f"torch {prov['torch']}, {prov['cpu_count']} cores, load average {_load(prov['loadavg_before'])} "
        f"before, {_load(prov['loadavg_after'])} after.",
        "",
        f"{setup['updates']} updates of {setup['message']['envelope_bytes']:,} B (a real LoraUpdate "
        f"envelope) per run, {setup['publishers']} publisher processes (confirms, mandatory), "
        f"1 consumer (manual ack, prefetch {setup['prefetch']}), quorum queue, throwaway vhost; "
        f"{setup['reps']} runs per side, alternating. Rate = updates acked by the consumer / seconds "
        "from the publishers' common start to the last ack.",
        "",
        "| | updates/s (runs) | median | spread (max-min)/median | MB/s | publish latency median "
        "| consumer ack median | broker cores | others' cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        row = s[side]
        runs = ", ".join(f"{x:.0f}" for x in row["updates_per_s"])
        lines.append(
            f"| {LABELS[side]} | {runs} | **{row['median_updates_per_s']:.0f}** | {row['spread_pct']:.1f}% "
            f"| {row['median_MB_per_s']:.0f} | {row['publish_latency_median_ms']:.2f} ms "
            f"| {row['consumer_ack_median_ms']:.3f} ms | {row['broker_cores_median']:.2f} "
            f"| {row['others_cores_median']:.2f} |"
        )
    ratio = s["ratio"]
    lines += [
        "",
        f"**lorafleet / raw = {ratio['of_medians'] * 100:.1f}%** of the medians (target >= 80%: "
        f"{'met' if ratio['meets_target'] else 'NOT met'}); per alternating pair "
        f"{', '.join(f'{x * 100:.1f}%' for x in ratio['per_pair'])}.",
        "",
        "Encoding one update (encode_tensors + envelope.encode) takes "
        f"{setup['message']['encode_ms_median']} ms here; it is outside the measured loop (both sides "
        "publish the same pre-encoded bytes).",
        "",
        "## Where the time goes (medians over the runs)",
        "",
        "| | publish phase updates/s | publish call median / p90 / mean | publisher CPU per update "
        "| consumer wait median / mean | consumer ack median / mean | cores: broker / publishers / "
        "consumer / irq / others |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        side_runs = [r for r in data["runs"] if r["side"] == side]

        def med(*path: str, side_runs: list[dict[str, Any]] = side_runs) -> float:
            values = []
            for r in side_runs:
                value: Any = r
                for key in path:
                    value = value[key]
                values.append(float(value))
            return statistics.median(values)

        cores = " / ".join(
            f"{med('cores', k):.2f}" for k in ("broker", "publishers", "consumer", "kernel_irq", "others")
        )
        lines.append(
            f"| {LABELS[side]} | {med('publish_updates_per_s'):.0f} "
            f"| {med('publish_latency', 'median_ms'):.1f} / {med('publish_latency', 'p90_ms'):.1f} / "
            f"{med('publish_latency', 'mean_ms'):.1f} ms | {med('publisher_cpu_s_per_update_ms'):.2f} ms "
            f"| {med('consumer_wait', 'median_ms'):.2f} / {med('consumer_wait', 'mean_ms'):.2f} ms "
            f"| {med('consumer_ack', 'median_ms'):.2f} / {med('consumer_ack', 'mean_ms'):.2f} ms | {cores} |"
        )
    lines += [
        "",
        "*publish phase*: updates over the seconds until the last publisher's last confirm (the consumer "
        "then drains what is queued). *publish call*: one `publish` / `basic_publish`, which returns at "
        "the broker's confirm. *consumer wait*: lorafleet's `get`; raw: the time between two delivery "
        "callbacks. *consumer ack*: lorafleet's `ack` (marshalled to the I/O thread, returns once it "
        "ran); raw: `basic_ack` in the callback. *others*: other processes on this shared host and kernel "
        "threads (the quorum queue's disk writeback).",
        "",
    ]
    if data.get("notes"):
        lines += [*data["notes"], ""]
    return "\n".join(lines)


def notes(data: dict[str, Any]) -> list[str]:
    """What the timings and profiles say, in figures (the Markdown's closing paragraphs)."""
    runs = data["runs"]

    def med(side: str, *path: str) -> float:
        values = []
        for r in runs:
            if r["side"] == side:
                value: Any = r
                for key in path:
                    value = value[key]
                values.append(float(value))
        return statistics.median(values)

    out = [
        "- **Publishing**, lorafleet vs raw: "
        f"{med('lorafleet', 'publisher_cpu_s_per_update_ms'):.2f} vs "
        f"{med('raw', 'publisher_cpu_s_per_update_ms'):.2f} ms of publisher CPU per update; a publish "
        "call (which waits for the broker's confirm) lasts, median, "
        f"{med('lorafleet', 'publish_latency', 'median_ms'):.1f} vs "
        f"{med('raw', 'publish_latency', 'median_ms'):.1f} ms.",
        "- **Consuming**, per update: lorafleet's consumer waits "
        f"{med('lorafleet', 'consumer_wait', 'mean_ms'):.2f} ms in `get` and "
        f"{med('lorafleet', 'consumer_ack', 'mean_ms'):.2f} ms in `ack` (means), raw pika's "
        f"{med('raw', 'consumer_wait', 'mean_ms'):.2f} ms from one callback to the next, "
        f"{med('raw', 'consumer_ack', 'mean_ms'):.2f} ms of it in `basic_ack`. lorafleet's subscription "
        "reads deliveries on its I/O thread while the service thread acks; raw pika's one thread reads, "
        "then acks (`basic_ack` flushes the frame before returning), then reads again.",
    ]
    profiles = data.get("profiles") or {}
    lf = ((profiles.get("lorafleet") or {}).get("publisher_0") or {}).get("calls", {})
    raw = ((profiles.get("raw") or {}).get("publisher_0") or {}).get("calls", {})
    if {"send", "pika.basic_publish"} <= set(lf) and {"send", "pika.basic_publish"} <= set(raw):

        def outside(calls: dict[str, dict[str, float]]) -> float:
            return (calls["send"]["cum_ms_per_call"] - calls["pika.basic_publish"]["cum_ms_per_call"]) * 1e3

        out.append(
            "- cProfile of publisher 0 (wall time, the profiler's overhead included): one publish "
            f"{lf['send']['cum_ms_per_call']:.2f} ms (lorafleet) vs {raw['send']['cum_ms_per_call']:.2f} ms "
            "(raw), of which pika's `basic_publish` (send + wait for the confirm) "
            f"{lf['pika.basic_publish']['cum_ms_per_call']:.2f} vs "
            f"{raw['pika.basic_publish']['cum_ms_per_call']:.2f} ms; the rest, {outside(lf):.0f} vs "
            f"{outside(raw):.0f} us, is lorafleet's own code (header check, properties, `_run`, the thread's "
            "connection) vs building the raw side's properties."
        )
    consumer = ((profiles.get("lorafleet") or {}).get("consumer") or {}).get("calls", {})
    if "lorafleet.ack" in consumer:
        out.append(
            "- cProfile of the lorafleet consumer thread: `ack` "
            f"{consumer['lorafleet.ack']['cum_ms_per_call']:.2f} ms per call (it returns once the I/O "
            "thread has run the `basic_ack`), `get` "
            f"{consumer.get('lorafleet.get', {}).get('cum_ms_per_call', float('nan')):.2f} ms."
        )
    return out


def _load(values: Any) -> str:
    return "/".join(f"{float(v):.2f}" for v in values)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["summary"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for x, side in enumerate(SIDES):
        row = s[side]
        median = row["median_updates_per_s"]
        ax.bar(x, median, color=("tab:blue", "tab:gray")[x], width=0.6, label=LABELS[side])
        ax.errorbar(x, median, yerr=[[median - row["min"]], [row["max"] - median]], color="black", capsize=8)
        ax.scatter([x] * len(row["updates_per_s"]), row["updates_per_s"], color="black", s=12, zorder=3)
        ax.annotate(f"{median:.0f}/s", (x, median), textcoords="offset points", xytext=(18, 4))
    ax.set_xticks(range(len(SIDES)), [LABELS[side] for side in SIDES])
    ax.set_ylabel("updates/s (acked by the consumer)")
    setup = data["setup"]
    ax.set_title(
        f"{setup['message']['envelope_bytes'] / 1000:.0f} KB updates, {setup['publishers']} publishers, "
        f"confirms + acks\nlorafleet/raw = {s['ratio']['of_medians'] * 100:.1f}% (median of "
        f"{setup['reps']} runs, bars: min-max)",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rabbitmq_version() -> str:
    try:
        out = subprocess.run(
            ["rabbitmqctl", "-q", "version"], check=True, capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=2000, help="updates per run")
    parser.add_argument("--reps", type=int, default=3, help="runs per side")
    parser.add_argument("--warmup", type=int, default=200, help="updates of each side's unmeasured first run")
    parser.add_argument("--publishers", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=8, help="the consumer's prefetch (the aggregator's)")
    parser.add_argument("--profile", action="store_true", help="one more cProfile'd run per side")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--wait-budget-s", type=float, default=45.0, help="waiting for a quiet host, in all")
    parser.add_argument("--out", type=Path, default=RESULTS / "broker_throughput")
    args = parser.parse_args()

    load_before = os.getloadavg()
    started = time.perf_counter()
    publishers = Publishers(args.publishers)  # forked first: no thread or connection exists yet
    body, message = build_update()
    # attempts=1: a run is not redone; the broker and the publishers are busy during it by design, so
    # its "foreign" cores are mostly theirs (each run's "cores" splits them from everyone else's)
    quiet = QuietRunner(max_foreign=0.5, attempts=1, wait_budget_s=args.wait_budget_s, unit_wait_s=10.0)
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    try:
        with throwaway_vhost(args.host, args.port) as url:
            transport = PikaTransport(url)
            declare_static_topology(transport)
            transport.close()
            declare_raw(url)
            for side in SIDES:
                if args.warmup > 0:
                    run_once(side, url, args.warmup, body, publishers, args.prefetch)
            for rep in range(args.reps):
                order = SIDES if rep % 2 == 0 else SIDES[::-1]
                for side in order:
                    unit = functools.partial(
                        run_once, side, url, args.updates, body, publishers, args.prefetch
                    )
                    result = run_retrying(quiet, f"{side}-{rep}", unit, url, publishers, failures)
                    result["rep"] = rep
                    result["loadavg_after"] = os.getloadavg()
                    runs.append(result)
                    print(
                        f"{side:9s} rep {rep}: {result['updates_per_s']:7.1f} updates/s "
                        f"(publish latency median {result['publish_latency']['median_ms']:.2f} ms, "
                        f"cores {result['cores']}, load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
            if args.profile:
                for side in SIDES:
                    profiled = run_once(
                        side, url, max(400, args.updates // 4), body, publishers, args.prefetch, profile=True
                    )
                    profiles[side] = profiled.pop("profile") | {"run": profiled}
    finally:
        publishers.close()

    by_side = {side: [r for r in runs if r["side"] == side] for side in SIDES}
    summary: dict[str, Any] = {side: summarise(by_side[side]) for side in SIDES}
    pairs = [
        lf["updates_per_s"] / raw["updates_per_s"]
        for lf, raw in zip(by_side["lorafleet"], by_side["raw"], strict=True)
    ]
    of_medians = summary["lorafleet"]["median_updates_per_s"] / summary["raw"]["median_updates_per_s"]
    summary["ratio"] = {
        "of_medians": round(of_medians, 4),
        "per_pair": [round(x, 4) for x in pairs],
        "target": 0.8,
        "meets_target": of_medians >= 0.8,
    }
    data: dict[str, Any] = {
        "provenance": provenance(f"{COMMAND} {' '.join(sys.argv[1:])}".strip(), load_before, quiet),
        "setup": {
            "updates": args.updates,
            "reps": args.reps,
            "warmup_updates": args.warmup,
            "publishers": args.publishers,
            "publisher_kind": "processes (fork), one connection each",
            "consumer": "one, in the benchmark's process",
            "foreign_load_note": "provenance.foreign_load counts every process but this one, so during a run "
            "it includes the broker and the publishers (never under the threshold); each run's 'cores' "
            "splits broker, publishers, consumer, irq and others",
            "prefetch": args.prefetch,
            "message": message,
            "queue": {"lorafleet": UPDATES_QUEUE, "raw": RAW_QUEUE, "arguments": RAW_QUEUE_ARGUMENTS},
            "pika": pika.__version__,
            "rabbitmq": _rabbitmq_version(),
            "python": sys.version.split()[0],
        },
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "profile"} for r in runs],
        # runs that failed and were redone (e.g. the shared broker restarted under them)
        "failed_attempts": failures,
        "profiles": profiles or None,
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    data["notes"] = notes(data)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), data)
    args.out.with_suffix(".md").write_text(markdown(data), encoding="utf-8")
    plot(data, args.out.with_suffix(".png"))
    print(markdown(data))
    print(f"runtime {data['runtime_s']} s")


if __name__ == "__main__":
    main()
