"""The aggregator pins glibc's mmap threshold in its own process (lorafleet/app/malloc.py), never in an
embedded run, where the same allocator serves training: pinned at 128 KiB there, every activation of a
MiniLM step was an mmap and a munmap, and a round of the Flower job took 83 s instead of 50 s (29 million
page faults, 90 s of system time for two rounds). A worker of its own pins it at the training threshold
(1 MiB), an embedded run's workers never."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.app import wiring
from lorafleet.app.malloc import TRAINING_MMAP_THRESHOLD_BYTES
from lorafleet.app.wiring import Shards, build_aggregator, build_runtime, build_worker
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from schemas.config import load_run_config

REPO = Path(__file__).resolve().parents[2]


def test_only_an_aggregator_of_its_own_pins_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    pins: list[tuple[object, ...]] = []
    monkeypatch.setattr(wiring, "pin_mmap_threshold", lambda *args: pins.append(args) or True)
    config = load_run_config(REPO / "examples" / "tiny.yaml")
    runtime = build_runtime(config)

    def aggregator(*, embedded: bool) -> None:
        transport = InMemoryTransport(InMemoryBroker())
        build_aggregator(config, transport, InMemoryStateStore(), runtime, out_dir=None, embedded=embedded)

    aggregator(embedded=True)
    assert pins == [], "an embedded run pinned the allocator its training uses"
    aggregator(embedded=False)
    assert len(pins) == 1


def test_only_a_worker_of_its_own_pins_the_allocator_at_the_training_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pins: list[tuple[object, ...]] = []
    monkeypatch.setattr(wiring, "pin_mmap_threshold", lambda *args: pins.append(args) or True)
    config = load_run_config(REPO / "examples" / "tiny.yaml")
    runtime = build_runtime(config)
    shards = Shards.load(config)

    def worker(*, own_process: bool) -> None:
        transport = InMemoryTransport(InMemoryBroker())
        build_worker(config, 0, transport, runtime, shards, own_process=own_process)

    worker(own_process=False)
    assert pins == [], "an embedded worker pinned the allocator the whole run shares"
    worker(own_process=True)
    assert pins == [(TRAINING_MMAP_THRESHOLD_BYTES,)]
