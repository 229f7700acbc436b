"""A 100 MB burst of updates on the real aggregator process: its memory grows by at most its buffer.

The aggregator (``python -m lorafleet aggregator``, with the real orchestrator beside it, as
test_faults.py starts them) takes updates from ``lf.updates`` with a prefetch of
``limits.aggregator_prefetch`` = ``limits.aggregator_buffer_bytes // limits.max_message_bytes``, so
it may hold at most that many messages of at most ``max_message_bytes`` each. This test plays eight
devices: each takes its round-1 task from its queue and answers it, all at once, with eight messages
of 12.5 MB on average (100 MB): five valid updates of 10.5 MB (LoRA rank 256 on query/value of the
ten blocks of a tiny BERT of hidden size 256) and three over the configured message limit (12 MiB)
by 3.3 MB each (an update padded with an extra tensor). The burst is published while the aggregator
is stopped (SIGSTOP), so the whole of it waits in the queue when it resumes, the worst case for what
it prefetches; its five valid updates close the round (quorum 5 of 8), which it merges, checkpoints
and evaluates while the last two oversize messages arrive.

What must hold:

* the aggregator's peak resident memory (``VmHWM``, reset just before the burst through
  ``/proc/PID/clear_refs``) exceeds its resident memory before the burst by at most
  ``max_message_bytes x prefetch`` (the prefetch read from the broker, ``rabbitmqctl
  list_consumers``) plus ``WORKING_SET_MESSAGES x max_message_bytes``, the working set of handling
  one message and of the round's merge (see :data:`WORKING_SET_MESSAGES`);
* the three oversize messages are dead-lettered ``too_large`` with their size in the detail, and
  the round is closed on quorum with the five valid updates and aggregated.

``benchmarks/update_burst.py`` runs the same burst and records the figures.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import torch

from lorafleet.security.signing import derive_device_key, sign
from lorafleet.transport import topology
from lorafleet.transport.base import DETAIL_HEADER, dead_letter_reason
from lorafleet.transport.rabbitmq import PikaTransport
from schemas.envelope import decode, encode
from schemas.messages import DeviceRegistered, LoraUpdate, TrainMetrics, TrainTask
from schemas.tensors import decode_tensors, encode_tensors
from tests.integration.test_faults import FLEET_KEY, Fleet, fleet_of, run_config

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

MiB = 1 << 20
DEVICES = 8
#: the configured message limit, and the buffer that makes the aggregator's prefetch 4
MAX_MESSAGE_BYTES = 12 * MiB
BUFFER_BYTES = 4 * MAX_MESSAGE_BYTES
#: the burst: 100 MB in 8 messages; which of them are over the limit (publish order)
BURST_BYTES = 100_000_000
OVERSIZE = (1, 6, 7)
#: What the aggregator may hold beyond its prefetched bodies, in messages of the limit (an update's
#: body, payload and tensors are each at most that): the merge of the round, which reads one update
#: at a time (aggregator.merge.rankwise), holds the adapter it starts from (1), the float64 running
#: sums (2) and the update being read, its payload and then its tensors (2); handling one delivery
#: takes less (its payload and its tensors beyond its body, which is one of the prefetched). Beside
#: either, pika joins a body from its frames (1 more while it joins).
WORKING_SET_MESSAGES = 6
#: the tiny model whose adapter (rank 256 on query/value of 10 blocks, hidden 256) is 10.5 MB
MODEL = {"name": "tiny", "max_seq_len": 16, "tiny_layers": 10, "tiny_hidden": 256, "torch_threads": 1}


def burst_config(run_id: str, *, max_message_bytes: int, buffer_bytes: int | None) -> dict[str, Any]:
    """Eight devices, rounds closing on 5 of 8 reports, a run long enough to stay up (2 rounds)."""
    limits: dict[str, Any] = {"max_message_bytes": max_message_bytes, "max_payload_bytes": max_message_bytes}
    if buffer_bytes is not None:
        limits["aggregator_buffer_bytes"] = buffer_bytes
    return run_config(
        run_id,
        {
            "model": MODEL,
            "data": {"samples_per_device": 16, "eval_samples": 32},
            "lora": {"rank": 256},
            "devices": {"count": DEVICES, "sleep": False},
            "rounds": {
                "max_rounds": 2,
                "quorum_fraction": 5 / DEVICES,
                "round_deadline_s": 900.0,
                "lease_s": 900.0,
            },
            "limits": limits,
        },
    )


# -- the aggregator process's memory ---------------------------------------------------------------


def _status_kib(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def rss(pid: int) -> int:
    """Resident bytes of the process now."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    """Resident bytes at the process's peak since the last :func:`reset_peak`."""
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak(pid: int) -> None:
    """Make ``VmHWM`` start again from the resident memory now (Linux clear_refs, value 5)."""
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def settle(pid: int, *, within: int = 2 * MiB, quiet_s: float = 3.0, timeout_s: float = 60.0) -> int:
    """Wait until the process's resident memory moved by less than ``within`` for ``quiet_s``; returns it."""
    deadline = time.monotonic() + timeout_s
    window: list[tuple[float, int]] = []
    while time.monotonic() < deadline:
        now = time.monotonic()
        window = [(t, v) for t, v in window if now - t <= quiet_s] + [(now, rss(pid))]
        values = [v for _, v in window]
        if now - window[0][0] >= quiet_s * 0.9 and max(values) - min(values) < within:
            return values[-1]
        time.sleep(0.1)
    raise AssertionError(f"the aggregator's memory did not settle within {timeout_s:.0f} s: {window}")


class Sampler:
    """VmRSS every ``period_s`` on a thread (the curve; the peak itself comes from VmHWM)."""

    def __init__(self, pid: int, period_s: float = 0.005) -> None:
        self.pid = pid
        self.period_s = period_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, AssertionError):
                self.samples.append((time.monotonic() - self._started, rss(self.pid)))
            self._stop.wait(self.period_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the broker's view -----------------------------------------------------------------------------


def _vhost(broker: str) -> str:
    return unquote(urlsplit(broker).path.lstrip("/")) or "/"


def consumer_prefetch(broker: str, queue: str) -> list[int]:
    """The prefetch of every consumer of ``queue``, as the broker reports it."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_consumers", "-p", _vhost(broker), "queue_name", "prefetch_count"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue and parts[1].isdigit():
            found.append(int(parts[1]))
    return found


def dead_letters(broker: str, expected: int, timeout_s: float = 60.0) -> list[tuple[str, str]]:
    """(reason, detail) of ``expected`` messages taken from the dead-letter queue."""
    transport = PikaTransport(broker)
    found: list[tuple[str, str]] = []
    try:
        subscription = transport.subscribe(topology.DEAD_LETTER_QUEUE, prefetch=expected + 1)
        deadline = time.monotonic() + timeout_s
        while len(found) < expected and time.monotonic() < deadline:
            delivery = subscription.get(0.5)
            if delivery is not None:
                found.append((dead_letter_reason(delivery.headers), str(delivery.headers.get(DETAIL_HEADER))))
                delivery.ack()
        extra = subscription.get(1.0)
        if extra is not None:
            found.append((dead_letter_reason(extra.headers), str(extra.headers.get(DETAIL_HEADER))))
            extra.ack()
    finally:
        transport.close()
    return found


# -- the devices -----------------------------------------------------------------------------------


def register_devices(broker: str, run_id: str) -> None:
    transport = PikaTransport(broker)
    try:
        topology.declare_static_topology(transport)  # as a broker that loaded definitions.json has it
        for i in range(DEVICES):
            device = f"dev-{i:04d}"
            message = DeviceRegistered(run_id=run_id, device_id=device, num_samples=100)
            transport.publish(
                topology.CONTROL_EXCHANGE,
                topology.register_key(device),
                encode(message),
                message_id=message.message_id,
            )
    finally:
        transport.close()


def take_tasks(broker: str, timeout_s: float = 240.0) -> list[TrainTask]:
    """Every device's round-1 task, from its own queue (declared when it registered)."""
    transport = PikaTransport(broker)
    tasks: list[TrainTask] = []
    try:
        for i in range(DEVICES):
            queue = topology.task_queue_name(f"dev-{i:04d}")
            deadline = time.monotonic() + timeout_s
            while True:
                with contextlib.suppress(Exception):
                    subscription = transport.subscribe(queue, prefetch=1)
                    delivery = subscription.get(1.0)
                    if delivery is not None:
                        task = decode(delivery.body)
                        assert isinstance(task, TrainTask)
                        delivery.ack()
                        subscription.close()
                        tasks.append(task)
                        break
                    subscription.close()
                if time.monotonic() > deadline:
                    raise AssertionError(f"no task in {queue} after {timeout_s:.0f} s")
                time.sleep(0.2)
    finally:
        transport.close()
    return tasks


def answer(task: TrainTask, index: int, *, pad_to: int | None) -> bytes:
    """A signed update of ``task``: its start tensors moved by a known step; with ``pad_to``, an
    extra tensor makes the encoded message about that many bytes."""
    tensors = {k: v + 0.01 * (index + 1) for k, v in decode_tensors(task.adapter).items()}

    def build(extra: int) -> bytes:
        payload_tensors = dict(tensors)
        if extra > 0:
            payload_tensors["pad"] = torch.zeros(extra // 4)
        update = LoraUpdate(
            task_id=task.task_id,
            run_id=task.run_id,
            round=task.round,
            device_id=task.device_id,
            plan_version=task.plan_version,
            num_samples=100,
            adapter=encode_tensors(payload_tensors),
            metrics=TrainMetrics(train_loss=1.0, steps=1, examples=100, compute_s=0.1),
        )
        key = derive_device_key(bytes.fromhex(FLEET_KEY), task.device_id)
        return encode(update.model_copy(update={"signature": sign(key, update)}))

    body = build(0)
    if pad_to is None:
        return body
    return build(pad_to - len(body))


@dataclass
class Burst:
    """What one burst measured."""

    max_message_bytes: int
    prefetch: int
    sizes: list[int]
    baseline_rss: int
    peak_rss: int
    after_rss: int
    seconds: float
    dead: list[tuple[str, str]]
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def increase(self) -> int:
        return self.peak_rss - self.baseline_rss

    @property
    def retained(self) -> int:
        return self.after_rss - self.baseline_rss

    @property
    def buffer_bound(self) -> int:
        return self.max_message_bytes * self.prefetch


def run_burst(fleet: Fleet, *, oversize: tuple[int, ...] = OVERSIZE, total: int = BURST_BYTES) -> Burst:
    """Start the orchestrator and the aggregator, play the devices, and measure the aggregator through
    one burst of ``DEVICES`` answers (those at ``oversize`` padded past the limit, ``total`` bytes in all)."""
    limit = int(fleet.config["limits"]["max_message_bytes"])
    fleet.start("orchestrator", "orchestrator")
    aggregator = fleet.start("aggregator", "aggregator")
    pid = aggregator.proc.pid
    register_devices(fleet.broker, fleet.run_id)
    tasks = take_tasks(fleet.broker)
    fleet.mark("round 1 open, tasks taken")
    valid = [answer(task, i, pad_to=None) for i, task in enumerate(tasks) if i not in oversize]
    each = (total - sum(len(b) for b in valid)) // len(oversize)
    assert each > limit, f"oversize messages of {each} B would not exceed the limit {limit} B"
    bodies = []
    for i, task in enumerate(tasks):
        bodies.append(answer(task, i, pad_to=each) if i in oversize else valid.pop(0))
    prefetch = fleet.wait_until(
        "the aggregator to consume lf.updates",
        lambda: consumer_prefetch(fleet.broker, topology.UPDATES_QUEUE),
        120.0,
    )
    assert len(prefetch) == 1, prefetch
    baseline = settle(pid)
    fleet.mark(f"aggregator settled at {baseline / MiB:.1f} MiB")
    transport = PikaTransport(fleet.broker)
    started = time.monotonic()
    try:
        with Sampler(pid) as sampler:
            reset_peak(pid)
            os.kill(pid, signal.SIGSTOP)
            try:
                for task, body in zip(tasks, bodies, strict=True):
                    key = topology.update_key(task.device_id)
                    transport.publish(
                        topology.UPDATES_EXCHANGE, key, body, message_id=f"update:{task.task_id}"
                    )
            finally:
                os.kill(pid, signal.SIGCONT)
            fleet.mark("burst published")
            fleet.wait_until("round 1 evaluated", lambda: "accuracy" in round_metrics(fleet, 1), 240.0)
            dead = dead_letters(fleet.broker, len(oversize))
            peak = peak_rss(pid)
            after = rss(pid)
    finally:
        transport.close()
    return Burst(
        limit,
        prefetch[0],
        [len(b) for b in bodies],
        baseline,
        peak,
        after,
        time.monotonic() - started,
        dead,
        sampler.samples,
    )


def round_metrics(fleet: Fleet, round_no: int) -> dict[str, Any]:
    return dict(fleet.store.get_round_metrics(fleet.run_id).get(round_no, {}))


@contextlib.contextmanager
def burst_fleet(
    root: Path, broker: str, state: str, run_id: str, *, max_message_bytes: int, buffer_bytes: int | None
) -> Iterator[Fleet]:
    config = burst_config(run_id, max_message_bytes=max_message_bytes, buffer_bytes=buffer_bytes)
    with fleet_of(root, config, broker, state) as fleet:
        yield fleet


def describe(burst: Burst) -> str:
    allowance = WORKING_SET_MESSAGES * burst.max_message_bytes
    return (
        f"burst of {sum(burst.sizes) / 1e6:.1f} MB in {len(burst.sizes)} messages {burst.sizes}; prefetch "
        f"{burst.prefetch}; aggregator {burst.baseline_rss / MiB:.1f} MiB resident before, peak "
        f"+{burst.increase / MiB:.1f} MiB, +{burst.retained / MiB:.1f} MiB after; bound "
        f"{burst.buffer_bound / MiB:.0f} + {allowance / MiB:.0f} MiB; {burst.seconds:.1f} s"
    )


@pytest.mark.timeout(600)
def test_a_100_mb_burst_raises_the_aggregators_memory_by_at_most_its_buffer(
    rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    with burst_fleet(
        tmp_path,
        rabbitmq_url,
        redis_url,
        run_id,
        max_message_bytes=MAX_MESSAGE_BYTES,
        buffer_bytes=BUFFER_BYTES,
    ) as fleet:
        # Given an aggregator whose buffer holds 4 messages of the limit, when a burst of 100 MB in
        # 8 messages (5 valid, 3 over the limit) reaches it all at once
        burst = run_burst(fleet)
        print(describe(burst))
        # Then it takes 4 at a time (the prefetch the broker reports), the oversize ones are
        # dead-lettered by their size without their bodies, the round closes on its 5 valid updates
        assert burst.prefetch == BUFFER_BYTES // MAX_MESSAGE_BYTES == 4
        assert [reason for reason, _ in burst.dead] == ["too_large"] * len(OVERSIZE), burst.dead
        for _, detail in burst.dead:
            assert re.fullmatch(
                r"message of \d+ bytes exceeds 12582912 \(its body was dropped unread\)", detail
            )
        info = fleet.store.get_round(fleet.run_id, 1)
        assert info is not None and info.status == "aggregated" and info.close_reason == "quorum"
        assert round_metrics(fleet, 1)["devices_reported"] == DEVICES - len(OVERSIZE)
        assert fleet.store.get_counters(fleet.run_id).get("rejected_too_large") == len(OVERSIZE)
        # and its resident memory rose by at most its prefetched messages and one working set
        allowance = WORKING_SET_MESSAGES * MAX_MESSAGE_BYTES
        assert burst.increase <= burst.buffer_bound + allowance, describe(burst)
