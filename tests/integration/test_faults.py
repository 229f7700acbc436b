"""Fault injection on loopback: the real services as separate OS processes, real RabbitMQ and Redis.

Every test starts the orchestrator, the aggregator and the workers with the commands a person would run
(``python -m lorafleet orchestrator|aggregator|worker CONFIG --broker URL ...``) on the tiny random BERT
with synthetic data, against a throwaway RabbitMQ vhost and a unique Redis run id. It injects its faults
at moments read from the state store (the round number, status and counted updates in Redis; a log
line where Redis cannot tell), not after fixed sleeps, and then checks that

* the run completes every planned round (``final_round == max_rounds``, ``finish_reason: max_rounds``);
* the final accuracy is within 0.01 of the fault-free run of the same seed (run once per module);
* no update was counted twice and every update is accounted for (:func:`check_accounting`);
* every round was aggregated exactly once (:func:`check_aggregated_once`).

Training is deterministic per (seed, round, device), so a fault that loses no update leaves the final
accuracy where the fault-free run put it (the tests find it equal). A frozen worker's updates are
rightly missing from the rounds it was dropped from; that test also compares with the same seed's run
without exactly those updates (embedded, in this process). Leaving one device out moves this model's
final accuracy by up to 0.0125 when it misses the last round and 0.0175 when it misses the last two
(measured on the embedded runner for each device), so the 0.01 bound against the fault-free run holds
there for the device and moment chosen (dev-0005 from round 2 on: 0.0075), not for every choice.

Each service logs (``-v``) to a file under the test's tmp directory; when a test fails, every log is
printed. Every wait is bounded, every process is SIGKILLed (after a SIGCONT) in a finally block, and
RabbitMQ's app is always started again (stop_app stops the whole broker, every vhost on it).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from lorafleet.state import keys
from lorafleet.state.redis import RedisStateStore
from lorafleet.transport import topology
from lorafleet.transport.base import QueueNotFound
from lorafleet.transport.rabbitmq import PikaTransport
from schemas.config import merge_overrides
from schemas.envelope import decode
from schemas.messages import LoraUpdate
from tests.conftest import (
    RABBITMQ_HOST,
    RABBITMQ_PORT,
    REDIS_HOST,
    REDIS_PORT,
    _port_open,
    _redis_ping,
    rabbitmqctl,
    throwaway_vhost,
)
from tests.integration.test_redis_outage import PrivateRedis

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis]

REPO = Path(__file__).resolve().parents[2]
DEVICES = 6
MAX_ROUNDS = 4
#: the final accuracy of a faulty run may differ from the fault-free run's by at most this much
ACCURACY_TOLERANCE = 0.01
#: bound on any one wait for the run to reach a state (generous: the machine's cores are shared)
WAIT_S = 240.0
TEST_TIMEOUT_S = 600

T = TypeVar("T")
FLEET_KEY = "74657374" * 8  # hex: the fleet key of every run in these tests


def run_config(run_id: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The experiment every test runs (it learns: see test_the_fault_free_run_learns).

    Workers really wait out an emulated device time (``devices.sleep``, speed 0.1: about 1.5 s per
    task) so that every round lasts long enough to put a fault inside it, at no CPU cost. The lease is
    long (60 s) except where a test is about the lease, so that a starved machine drops nobody.
    """
    base = {
        "run_id": run_id,
        "seed": 0,
        "strategy": "fedlora",
        "model": {
            "name": "tiny",
            "max_seq_len": 32,
            "tiny_layers": 2,
            "tiny_hidden": 128,
            "torch_threads": 1,
        },
        "data": {"dataset": "synthetic", "samples_per_device": 128},
        "lora": {"rank": 4},
        "training": {"batch_size": 16, "lr": 0.01, "local_epochs": 4},
        "devices": {"count": DEVICES, "sleep": True, "profile": {"speed": 0.1}},
        "rounds": {
            "max_rounds": MAX_ROUNDS,
            "lease_s": 60.0,
            "heartbeat_s": 2.0,
            "registration_timeout_s": 300.0,
        },
    }
    return merge_overrides(base, overrides or {})


# -- infrastructure -------------------------------------------------------------------------------------


def _require_servers() -> None:
    if not _port_open(RABBITMQ_HOST, RABBITMQ_PORT) or not _redis_ping():
        if os.environ.get("CI"):
            pytest.fail("RabbitMQ or Redis is not reachable and CI is set")
        pytest.skip("RabbitMQ or Redis is not reachable")


def with_heartbeat(url: str, seconds: int) -> str:
    return re.sub(r"heartbeat=\d+", f"heartbeat={seconds}", url)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        LORAFLEET_FLEET_KEY=FLEET_KEY,  # the distributed services require signatures by default
    )
    return env


@dataclass
class Service:
    name: str
    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    killed: bool = False


class Fleet:
    """The services of one run as OS processes, with their logs, and the run's state in Redis."""

    def __init__(self, root: Path, config: dict[str, Any], broker: str, state: str) -> None:
        self.root = root
        self.logs = root / "logs"
        self.out = root / "out"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.run_id: str = config["run_id"]
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.broker = broker
        self.state_url = state
        self.store = RedisStateStore(state)
        self.redis = self.store._r  # the store's client: it follows a Sentinel URL too
        self.services: dict[str, Service] = {}
        self.all: list[Service] = []
        self.started_at = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    # -- processes ------------------------------------------------------------------------------
    def start(self, name: str, role: str, *, device: str | None = None, broker: str | None = None) -> Service:
        """Start (or restart, under the same name) one service."""
        cmd = [sys.executable, "-m", "lorafleet", role, str(self.config_path)]
        cmd += ["--broker", broker or self.broker, "--threads", "1", "-v"]
        if role != "worker":
            cmd += ["--state", self.state_url, "--out", str(self.out)]
        if device is not None:
            cmd += ["--device-id", device]
        incarnation = sum(1 for s in self.all if s.name == name)
        log = self.logs / f"{name}.{incarnation}.log"
        with log.open("wb") as handle:
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=_env())
        service = Service(name, role, proc, log)
        self.services[name] = service
        self.all.append(service)
        return service

    def start_run(self, *, workers: list[str | None] | None = None) -> list[Service]:
        """The orchestrator, the aggregator and one worker per entry (a device id, or None: claims a slot)."""
        self.start("orchestrator", "orchestrator")
        self.start("aggregator", "aggregator")
        devices: list[str | None] = workers if workers is not None else [None] * DEVICES
        return [self.start(f"worker-{i}", "worker", device=d) for i, d in enumerate(devices)]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        service = self.services[name]
        if sig == signal.SIGKILL:
            service.killed = True
        os.kill(service.proc.pid, sig)
        if sig == signal.SIGKILL:
            service.proc.wait(timeout=30)
        self.mark(f"{signal.Signals(sig).name} {name}")

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.started_at))
        print(f"[{time.monotonic() - self.started_at:7.1f} s] {what}")

    def check_alive(self) -> None:
        """Fail at once when a service exits with an error (rather than waiting for a timeout)."""
        for service in self.all:
            code = service.proc.poll()
            if code not in (None, 0) and not service.killed:
                raise AssertionError(f"{service.name} ({service.log.name}) exited with status {code}")

    def wait_until(self, what: str, predicate: Callable[[], T | None], timeout: float = WAIT_S) -> T:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    # -- the run's state -------------------------------------------------------------------------
    def current_round(self) -> int:
        return int(self.store.get_run_fields(self.run_id).get("round", 0))

    def wait_round(self, round_no: int, *, reported: int = 0, timeout: float = WAIT_S) -> None:
        """Until round ``round_no`` is open with at least ``reported`` updates counted (mid-round)."""

        def due() -> bool:
            info = self.store.get_round(self.run_id, round_no)
            if info is not None and info.status != "open":
                raise AssertionError(f"round {round_no} closed before the test saw it open")
            return info is not None and info.reported >= reported

        self.wait_until(f"round {round_no} open with >= {reported} updates", due, timeout)
        self.mark(f"round {round_no} open, >= {reported} reported")

    def wait_mid_round(self, round_no: int) -> list[str]:
        """Until round ``round_no`` is open with an update counted and others still to come; held there.

        Once the round is open (tasks out, about 1.5 s before any update), every worker but the first
        live one is frozen (SIGSTOP), so the round cannot close between two polls however close
        together its updates arrive (they did, on a loaded CI host). Returns the frozen workers, for
        ``resume``.
        """
        self.wait_round(round_no)
        workers = [s.name for s in self.services.values() if s.role == "worker" and s.proc.poll() is None]
        frozen = workers[1:]
        for name in frozen:
            self.kill(name, signal.SIGSTOP)
        self.wait_round(round_no, reported=1)
        return frozen

    def resume(self, names: list[str]) -> None:
        for name in names:
            self.kill(name, signal.SIGCONT)

    def wait_closed(self, round_no: int, timeout: float = WAIT_S) -> None:
        def closed() -> bool:
            info = self.store.get_round(self.run_id, round_no)
            return info is not None and info.status != "open"

        self.wait_until(f"round {round_no} closed", closed, timeout)
        self.mark(f"round {round_no} closed")

    def wait_services_done(self, timeout: float = WAIT_S) -> dict[str, Any]:
        """Until the orchestrator and the aggregator exit (status 0); returns report.json."""
        for name in ("orchestrator", "aggregator"):
            service = self.services[name]
            self.wait_until(f"{name} to exit", lambda s=service: s.proc.poll() is not None, timeout)
            assert service.proc.returncode == 0, f"{name} exited with status {service.proc.returncode}"
        self.mark("orchestrator and aggregator done")
        report: dict[str, Any] = json.loads((self.out / "report.json").read_text(encoding="utf-8"))
        return report

    def wait_workers_done(self, timeout: float = 120.0) -> None:
        """Until every live worker exits with status 0 (workers exit on RunFinished)."""
        workers = [s for s in self.services.values() if s.role == "worker" and not s.killed]
        for service in workers:
            self.wait_until(f"{service.name} to exit", lambda s=service: s.proc.poll() is not None, timeout)
            assert service.proc.returncode == 0, f"{service.name} exited with {service.proc.returncode}"
        self.mark("workers done")

    def claimed_slot(self, name: str, incarnation: int = 0) -> str | None:
        """The device slot a worker started without --device-id claimed (from its log)."""
        text = (self.logs / f"{name}.{incarnation}.log").read_text(encoding="utf-8", errors="replace")
        found = re.search(r"claimed device slot (dev-\d+)", text)
        return found.group(1) if found else None

    def wait_claimed(self, name: str) -> str:
        return self.wait_until(f"{name} to claim a slot", lambda: self.claimed_slot(name), 120.0)

    def log_lines(self, role: str, pattern: str) -> list[re.Match[str]]:
        found: list[re.Match[str]] = []
        for service in self.all:
            if service.role == role:
                text = service.log.read_text(encoding="utf-8", errors="replace")
                found += list(re.finditer(pattern, text))
        return found

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        for service in self.all:
            if service.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(service.proc.pid, signal.SIGCONT)
                    service.proc.kill()
        for service in self.all:
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.proc.wait(timeout=30)
        try:
            self.store.delete_run(self.run_id)
        finally:
            self.store.close()
            self.redis.close()

    def dump_logs(self, tail: int = 400) -> None:
        for service in self.all:
            lines = service.log.read_text(encoding="utf-8", errors="replace").splitlines()
            print(f"\n===== {service.log.name} (exit {service.proc.poll()}, last {tail} lines) =====")
            print("\n".join(lines[-tail:]))


@contextlib.contextmanager
def fleet_of(root: Path, config: dict[str, Any], broker: str, state: str) -> Iterator[Fleet]:
    fleet = Fleet(root, config, broker, state)
    try:
        yield fleet
    except BaseException:
        fleet.dump_logs()
        raise
    finally:
        fleet.close()


# -- checks ---------------------------------------------------------------------------------------------


@dataclass
class Accounting:
    counted: int  # updates counted over all rounds (trained + empty)
    trained: int  # counted updates that carry tensors
    empty: int  # tasks reported empty (the device vanished, or TaskFailed)
    dropped_tasks: dict[int, list[str]]  # round -> devices whose task was reported empty


def check_completed(report: dict[str, Any]) -> None:
    assert report["final_round"] == MAX_ROUNDS, report["final_round"]
    assert report["finish_reason"] == "max_rounds", report["finish_reason"]
    assert [r["round"] for r in report["rounds"]] == list(range(1, MAX_ROUNDS + 1))
    assert report["final_accuracy"] is not None
    assert report["final_accuracy"] == report["rounds"][-1]["accuracy"]
    # every round's close was accounted by the orchestrator (times, virtual clock), whoever saw it
    virtual = 0.0
    for entry in report["rounds"]:
        missing = [k for k in ("wall_time_s", "round_time_s", "virtual_time_s") if entry[k] is None]
        assert not missing, f"round {entry['round']}: no {missing}"
        virtual += entry["virtual_round_s"]
        assert entry["virtual_time_s"] == pytest.approx(virtual), entry


def check_accounting(
    fleet: Fleet, report: dict[str, Any], *, leftover_updates: int = 0, lost_with_state: bool = False
) -> Accounting:
    """No update counted twice, and every update accounted for.

    Precisely, for every round r: the round's counted updates in Redis (one entry per task id, the
    ``reported`` field) are exactly its ``tasks_issued`` tasks (quorum 1.0, closed on quorum, no
    deadline close), one task per device; ``devices_reported`` is the number of them that carry
    tensors, the rest are empty (device dropped by its lease, or TaskFailed). Over the run the
    ``update_counted`` counter equals the sum of those counted entries (nothing counted twice), every
    other delivery the aggregator handled ended ``duplicate`` or ``late`` (no ``unknown_task``,
    ``wrong_device``, no rejection, no dead letter, no TaskFailed), ``tasks_dropped`` equals the empty
    entries, and nothing is left unconsumed in the updates queue except ``leftover_updates`` (updates a
    frozen worker sent after the aggregator had finished; the caller checks what they are). With
    ``lost_with_state``, updates counted in a state the store lost (resent and counted again) may end
    ``lost_with_state``.
    """
    run_id = fleet.run_id
    store = fleet.store
    assert store.list_rounds(run_id) == list(range(1, MAX_ROUNDS + 1))
    counted = trained = empty = 0
    dropped: dict[int, list[str]] = {}
    for entry in report["rounds"]:
        r = entry["round"]
        info = store.get_round(run_id, r)
        assert info is not None
        updates = store.get_updates(run_id, r)
        assert len(set(info.tasks.values())) == len(info.tasks), f"round {r}: a device got two tasks"
        assert set(updates) == set(info.tasks), (
            f"round {r}: counted {sorted(updates)} of {sorted(info.tasks)}"
        )
        assert info.reported == len(updates)
        assert info.close_reason == "quorum", f"round {r} closed on {info.close_reason}"
        with_tensors = [t for t, body in updates.items() if body]
        assert entry["tasks_issued"] == len(info.tasks)
        assert entry["devices_reported"] == len(with_tensors) <= entry["tasks_issued"]
        counted += len(updates)
        trained += len(with_tensors)
        empty += len(updates) - len(with_tensors)
        dropped[r] = sorted(info.tasks[t] for t, body in updates.items() if not body)
    counters = store.get_counters(run_id)
    assert counters.get("update_counted", 0) == counted, (counters, counted)
    assert report["updates"].get("counted") == counted
    allowed = {"counted", "duplicate", "late"} | ({"lost_with_state"} if lost_with_state else set())
    assert set(report["updates"]) <= allowed, report["updates"]
    assert report["rejected"] == {}, report["rejected"]
    assert report["tasks_failed"] == 0
    assert report["tasks_dropped"] == empty, (report["tasks_dropped"], dropped)
    transport = PikaTransport(fleet.broker)
    try:
        assert transport.queue_depth(topology.UPDATES_QUEUE) == leftover_updates
        assert transport.queue_depth(topology.DEAD_LETTER_QUEUE) == 0
    finally:
        transport.close()
    print(f"accounting: {report['updates']}, tasks_dropped {empty}, tasks_purged {report['tasks_purged']}")
    return Accounting(counted, trained, empty, dropped)


def check_aggregated_once(fleet: Fleet) -> None:
    """Every round aggregated exactly once.

    In Redis: each round is ``aggregated`` with ``global_version == round``, closed and aggregated by
    one call each (``closed_by``/``aggregated_by``, written once by the Lua scripts), nothing pending,
    and the global adapter is at version ``max_rounds``. In the aggregators' logs (every incarnation):
    exactly one ``round N closed`` line per round, a line that is written only after ``mark_aggregated``
    succeeded (a restarted aggregator that finds a round still pending re-runs it without merging
    again, because the stored global version already covers it).
    """
    run_id = fleet.run_id
    for r in range(1, MAX_ROUNDS + 1):
        info = fleet.store.get_round(run_id, r)
        assert info is not None and info.status == "aggregated", (r, info)
        assert info.global_version == r
        raw = fleet.redis.hmget(keys.round_state(run_id, r), ["closed_by", "aggregated_by"])
        assert all(raw), f"round {r}: closed_by/aggregated_by missing"
    assert fleet.store.pending_aggregations(run_id) == []
    stored = fleet.store.get_global_adapter(run_id)
    assert stored is not None and stored[0] == MAX_ROUNDS
    closed = Counter(
        int(m.group(1)) for m in fleet.log_lines("aggregator", r"aggregator: round (\d+) closed")
    )
    assert closed == Counter(range(1, MAX_ROUNDS + 1)), f"aggregations per round: {dict(closed)}"


def check_accuracy(report: dict[str, Any], baseline: Baseline) -> None:
    accuracy = report["final_accuracy"]
    print(f"final accuracy {accuracy} (fault-free {baseline.accuracy})")
    assert abs(accuracy - baseline.accuracy) <= ACCURACY_TOLERANCE + 1e-9, (accuracy, baseline.accuracy)


def check_task_queues_empty(fleet: Fleet) -> None:
    transport = PikaTransport(fleet.broker)
    try:
        for device in [f"dev-{i:04d}" for i in range(DEVICES)]:
            with contextlib.suppress(QueueNotFound):
                depth = transport.queue_depth(topology.task_queue_name(device))
                assert depth == 0, f"{device}: {depth} messages left in its task queue"
    finally:
        transport.close()


# -- the fault-free run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    accuracy: float
    chance: float
    report: dict[str, Any]
    seconds: float


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """The fault-free run of the same seed, once per module (every check applies to it too)."""
    _require_servers()
    started = time.monotonic()
    with throwaway_vhost() as broker:
        config = run_config(f"t-{uuid.uuid4().hex[:12]}")
        state = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
        with fleet_of(tmp_path_factory.mktemp("baseline"), config, broker, state) as fleet:
            fleet.start_run(workers=[f"dev-{i:04d}" for i in range(DEVICES)])
            report = fleet.wait_services_done()
            fleet.wait_workers_done()
            check_completed(report)
            accounting = check_accounting(fleet, report)
            assert accounting.empty == 0 and report["updates"] == {"counted": MAX_ROUNDS * DEVICES}
            check_aggregated_once(fleet)
            check_task_queues_empty(fleet)
    from lorafleet.data.datasets import eval_set
    from schemas.config import parse_run_config

    labels = eval_set(parse_run_config(config)).labels
    chance = max(Counter(labels).values()) / len(labels)
    seconds = time.monotonic() - started
    print(f"fault-free run: accuracy {report['final_accuracy']} (chance {chance}), {seconds:.0f} s")
    return Baseline(float(report["final_accuracy"]), chance, report, seconds)


# -- tests ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_the_fault_free_run_learns(baseline: Baseline) -> None:
    # (the baseline fixture ran it and checked completion, accounting and single aggregation)
    accuracies = [r["accuracy"] for r in baseline.report["rounds"]]
    assert baseline.accuracy >= baseline.chance + 0.25, (accuracies, baseline.chance)
    assert accuracies[0] < baseline.accuracy


def device_ids(n: int = DEVICES) -> list[str | None]:
    return [f"dev-{i:04d}" for i in range(n)]


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_sigkilled_workers_are_replaced_by_workers_that_claim_their_slots(
    baseline: Baseline, rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"random seed {seed}")
    with fleet_of(tmp_path, run_config(run_id), rabbitmq_url, redis_url) as fleet:
        # Given six workers started without --device-id (each claims a slot)
        workers = fleet.start_run()
        slots = {w.name: fleet.wait_claimed(w.name) for w in workers}
        assert sorted(slots.values()) == device_ids()
        # When a third of them is SIGKILLed, each at a random moment of a round (rounds 2 and 3), and
        # a replacement without --device-id is started at once
        victims = rng.sample(sorted(slots), DEVICES // 3)
        replaced: dict[str, str] = {}
        for k, victim in enumerate(victims):
            fleet.wait_round(2 + k)
            time.sleep(rng.uniform(0.0, 2.5))  # a task lasts about 1.5-3 s
            fleet.kill(victim)
            replacement = f"replacement-{k}"
            fleet.start(replacement, "worker")
            replaced[replacement] = victim
        # Then each replacement claims exactly the slot its victim held
        for replacement, victim in replaced.items():
            assert fleet.wait_claimed(replacement) == slots[victim]
        report = fleet.wait_services_done()
        fleet.wait_workers_done()
        # ... the run completes with the same result, nothing counted twice, each round aggregated once
        check_completed(report)
        accounting = check_accounting(fleet, report)
        assert accounting.empty == 0  # nobody was dropped: the replacements trained the victims' tasks
        check_aggregated_once(fleet)
        check_accuracy(report, baseline)
        check_task_queues_empty(fleet)
        # ... and every slot was retired when the run finished (no token left for a late claimer)
        assert slots_left(fleet) == 0


def dropped_reference_accuracy(config: dict[str, Any], dropped: dict[int, list[str]], out: Path) -> float:
    """The final accuracy of the same seed's run (embedded, in this process) in which exactly the
    ``dropped`` tasks (round -> devices) reported empty, as a vanished device's tasks do."""
    from lorafleet.app.embedded import run_embedded
    from schemas.config import device_id, parse_run_config

    class Dropping:
        def __init__(self, device: str, inner: Any) -> None:
            self.device, self.inner = device, inner

        def train(self, task: Any, start: Any) -> Any:
            if self.device in dropped.get(task.round, []):
                raise RuntimeError("dropped in the distributed run")  # reported as TaskFailed: empty
            return self.inner.train(task, start)

    report = run_embedded(
        parse_run_config(config), out, quiet=True, wrap_trainer=lambda i, inner: Dropping(device_id(i), inner)
    )
    assert report["tasks_failed"] == sum(len(d) for d in dropped.values())
    return float(report["final_accuracy"])


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_frozen_worker_is_dropped_by_its_lease_and_the_run_goes_on(
    baseline: Baseline,
    rabbitmq_url: str,
    redis_url: str,
    run_id: str,
    tmp_path: Path,
) -> None:
    # Short lease and heartbeats (app and AMQP) so that a frozen worker is noticed within seconds
    config = run_config(run_id, {"rounds": {"lease_s": 4.0, "heartbeat_s": 1.0}})
    frozen = "dev-0005"
    with fleet_of(tmp_path, config, with_heartbeat(rabbitmq_url, 3), redis_url) as fleet:
        fleet.start_run(workers=device_ids())
        # When one worker is SIGSTOPped as round 1 closes (frozen: its sockets stay open, and round 2's
        # task reaches them), so that it misses rounds 2 to 4 whatever the timing
        fleet.wait_closed(1)
        fleet.kill("worker-5", signal.SIGSTOP)
        stopped_at = time.monotonic()
        # Then its lease runs out and round 2 goes on without it
        fleet.wait_closed(2, timeout=60.0)
        print(f"round 2 closed {time.monotonic() - stopped_at:.1f} s after the SIGSTOP")
        report = fleet.wait_services_done()
        # ... and, woken up at the end, it finishes its stale work and exits on RunFinished
        fleet.kill("worker-5", signal.SIGCONT)
        fleet.wait_workers_done()
        check_completed(report)
        leftovers = peek_updates(fleet.broker)
        print(f"{len(leftovers)} update(s) sent after the run: {[(u.round, u.device_id) for u in leftovers]}")
        accounting = check_accounting(fleet, report, leftover_updates=len(leftovers))
        # ... it was dropped from round 2 on (and only it, and only then)
        assert accounting.dropped_tasks == {1: [], 2: [frozen], 3: [frozen], 4: [frozen]}
        # ... what it sent after waking up is for tasks already reported empty (late, never counted)
        for update in leftovers:
            assert update.device_id == frozen and frozen in accounting.dropped_tasks[update.round]
        check_aggregated_once(fleet)
        # ... and the result is the same seed's run without its updates of rounds 2-4
        reference = dropped_reference_accuracy(config, accounting.dropped_tasks, tmp_path / "ref")
        print(f"reference without {frozen}'s updates of rounds 2-4: {reference}")
        assert abs(report["final_accuracy"] - reference) <= ACCURACY_TOLERANCE + 1e-9
        check_accuracy(report, baseline)


def peek_updates(broker: str) -> list[LoraUpdate]:
    """What is left in the updates queue (read without acking: it stays there)."""
    transport = PikaTransport(broker)
    found: list[LoraUpdate] = []
    try:
        left = transport.queue_depth(topology.UPDATES_QUEUE)
        if left:
            subscription = transport.subscribe(topology.UPDATES_QUEUE, prefetch=left)
            while len(found) < left:
                delivery = subscription.get(10.0)
                assert delivery is not None, "an update left in the queue was not delivered"
                message = decode(delivery.body)
                assert isinstance(message, LoraUpdate), message
                found.append(message)
            subscription.close()  # unacked: back to the queue
    finally:
        transport.close()
    return found


def slots_left(fleet: Fleet) -> int:
    transport = PikaTransport(fleet.broker)
    try:
        return transport.queue_depth(topology.SLOTS_QUEUE)
    finally:
        transport.close()


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_the_run_survives_a_rabbitmq_restart(
    baseline: Baseline, rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    with fleet_of(tmp_path, run_config(run_id), rabbitmq_url, redis_url) as fleet:
        # Given six workers that each hold a slot token (started without --device-id)
        workers = fleet.start_run()
        slots = {w.name: fleet.wait_claimed(w.name) for w in workers}
        # When the RabbitMQ application is stopped mid-round and started again
        fleet.wait_round(2)  # open, tasks out (a wider window than a first update)
        try:
            fleet.mark("rabbitmqctl stop_app")
            rabbitmqctl("stop_app", timeout=180)
            fleet.mark("stopped")
        finally:
            rabbitmqctl("start_app", timeout=180)
            fleet.mark("started again")
        # Then every worker takes its own slot token back (the broker returned them all to the queue);
        # the orchestrator is held frozen meanwhile so that the run cannot end first
        fleet.kill("orchestrator", signal.SIGSTOP)
        for worker in workers:
            fleet.wait_until(
                f"{worker.name} to hold its slot again",
                lambda w=worker: "holding it again" in w.log.read_text(encoding="utf-8", errors="replace"),
                timeout=120.0,
            )
        fleet.mark("every worker holds its own slot again")
        # ... so that when a worker dies now, its replacement gets exactly the dead worker's slot
        fleet.kill("worker-0")
        fleet.start("replacement", "worker")
        assert fleet.wait_claimed("replacement") == slots["worker-0"]
        fleet.kill("orchestrator", signal.SIGCONT)
        # ... and every service reconnects and the run completes with the same result
        report = fleet.wait_services_done()
        fleet.wait_workers_done()
        check_completed(report)
        accounting = check_accounting(fleet, report)
        assert accounting.empty == 0
        check_aggregated_once(fleet)
        check_accuracy(report, baseline)
        check_task_queues_empty(fleet)
        assert slots_left(fleet) == 0, "slot tokens were not retired"


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_broker_outage_longer_than_the_lease_drops_no_live_device(
    baseline: Baseline, rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    # Given leases shorter than the outage to come (6 s, heartbeats every 2 s)
    config = run_config(run_id, {"rounds": {"lease_s": 6.0, "heartbeat_s": 2.0}})
    with fleet_of(tmp_path, config, rabbitmq_url, redis_url) as fleet:
        fleet.start_run(workers=device_ids())
        # When the broker is away for 13 s mid-round (no heartbeat can reach the orchestrator)
        fleet.wait_round(2)  # open, tasks out (a wider window than a first update)
        try:
            fleet.mark("rabbitmqctl stop_app")
            rabbitmqctl("stop_app", timeout=180)
            time.sleep(13.0)
        finally:
            rabbitmqctl("start_app", timeout=180)
            fleet.mark("started again")
        # Then no live device is declared vanished: every update is counted, the result is the
        # fault-free one (before: devices were dropped and their real updates acked as duplicates)
        report = check_resumed_run(fleet, baseline)
        assert report["tasks_dropped"] == 0


def check_resumed_run(fleet: Fleet, baseline: Baseline) -> dict[str, Any]:
    """The run completed with the fault-free result, nothing lost or counted twice; its report."""
    report = fleet.wait_services_done()
    fleet.wait_workers_done()
    check_completed(report)
    accounting = check_accounting(fleet, report)
    assert accounting.empty == 0
    check_aggregated_once(fleet)
    check_accuracy(report, baseline)
    check_task_queues_empty(fleet)
    return report


def updates_waiting(fleet: Fleet) -> int:
    transport = PikaTransport(fleet.broker)
    try:
        return transport.queue_depth(topology.UPDATES_QUEUE)
    finally:
        transport.close()


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_sigkilled_aggregator_restarted_mid_round_resumes_the_run(
    baseline: Baseline, rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    with fleet_of(tmp_path, run_config(run_id), rabbitmq_url, redis_url) as fleet:
        fleet.start_run(workers=device_ids())
        # When the aggregator is SIGKILLed mid-round (round 2 open, some of its updates counted) ...
        frozen = fleet.wait_mid_round(2)
        fleet.kill("aggregator")
        counted = fleet.store.get_round(fleet.run_id, 2)
        assert counted is not None and counted.status == "open"
        assert counted.reported < DEVICES
        fleet.resume(frozen)
        # ... and restarted with the same command once the rest of round 2's updates wait in the queue
        fleet.wait_until(
            "round 2's other updates", lambda: updates_waiting(fleet) >= DEVICES - counted.reported
        )
        fleet.mark(f"{updates_waiting(fleet)} updates waiting")
        fleet.start("aggregator", "aggregator")
        # Then the restarted aggregator closes round 2, and the run completes with the same result,
        # nothing counted twice, and each round aggregated once
        check_resumed_run(fleet, baseline)
        assert len(fleet.log_lines("aggregator", r"aggregator: round 2 closed")) == 1
        assert "round 2 closed" in (fleet.logs / "aggregator.1.log").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_sigkilled_orchestrator_restarted_with_the_same_command_resumes_the_run(
    baseline: Baseline, rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    with fleet_of(tmp_path, run_config(run_id), rabbitmq_url, redis_url) as fleet:
        fleet.start_run(workers=device_ids())
        # When the orchestrator is SIGKILLed mid-round and restarted while the round is still open
        # (the aggregator is held frozen meanwhile, so that round 2 cannot close) ...
        fleet.wait_round(2)  # open, tasks out (a wider window than a first update)
        fleet.kill("aggregator", signal.SIGSTOP)
        fleet.kill("orchestrator")
        fleet.start("orchestrator", "orchestrator")
        fleet.wait_until(
            "the orchestrator to resume in round 2",
            lambda: fleet.log_lines("orchestrator", r"resuming run \S+ at round 2"),
        )
        fleet.kill("aggregator", signal.SIGCONT)
        # ... and SIGKILLed again mid-round 3, restarted only after round 3 was aggregated without it
        frozen = fleet.wait_mid_round(3)
        fleet.kill("orchestrator")
        fleet.resume(frozen)
        fleet.wait_until(
            "round 3 aggregated",
            lambda: (i := fleet.store.get_round(fleet.run_id, 3)) is not None and i.status == "aggregated",
        )
        fleet.mark("round 3 aggregated")
        fleet.start("orchestrator", "orchestrator")
        # Then the run completes with the same result, nothing counted twice, each round aggregated
        # once, and the rounds it missed are accounted (check_completed)
        check_resumed_run(fleet, baseline)


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_worker_started_mid_run_trains_from_the_next_round_on(
    rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    # The run begins with DEVICES - 1 workers (min_devices)
    late = f"dev-{DEVICES - 1:04d}"
    config = run_config(run_id, {"rounds": {"min_devices": DEVICES - 1}})
    with fleet_of(tmp_path, config, rabbitmq_url, redis_url) as fleet:
        fleet.start_run(workers=device_ids(DEVICES - 1))
        # When a worker for the last slot is started after round 1 closed (the aggregator is held
        # frozen until it has registered, so that the run cannot end first however slow it starts)
        fleet.wait_closed(1)
        fleet.kill("aggregator", signal.SIGSTOP)
        fleet.start("worker-late", "worker", device=late)
        fleet.wait_until(f"{late} to register", lambda: late in fleet.store.get_devices(fleet.run_id))
        joined = fleet.current_round()
        fleet.mark(f"{late} registered during round {joined}")
        fleet.kill("aggregator", signal.SIGCONT)
        assert joined < MAX_ROUNDS
        report = fleet.wait_services_done()
        fleet.wait_workers_done()
        check_completed(report)
        check_accounting(fleet, report)
        check_aggregated_once(fleet)
        # Then round 1 went without it, and every round opened after it registered has its task,
        # which it trained
        for r in range(1, MAX_ROUNDS + 1):
            info = fleet.store.get_round(fleet.run_id, r)
            assert info is not None
            trained = fleet.store.get_round_metrics(fleet.run_id)[r]["devices"]
            if r == 1:
                assert late not in info.tasks.values()
            if r > joined:
                assert late in info.tasks.values(), f"round {r} has no task for {late}"
                assert late in trained, f"{late} did not train round {r}"


def _pids(*needles: str) -> list[int]:
    """Processes of this host whose command line holds every one of ``needles``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmdline for n in needles):
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_the_launcher_restarts_sigkilled_workers_and_the_run_completes(
    baseline: Baseline, rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    with fleet_of(tmp_path, run_config(run_id), rabbitmq_url, redis_url) as fleet:
        # Given the one-command distributed mode (the launcher starts every service itself)
        command = [sys.executable, "-m", "lorafleet", "run", str(fleet.config_path), "--out", str(fleet.out)]
        command += ["--broker", rabbitmq_url, "--state", redis_url]
        with (fleet.logs / "launcher.log").open("wb") as handle:
            launcher = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=_env()
            )
        try:
            # When two of its six workers are SIGKILLed in round 3, mid-round
            fleet.wait_round(3)
            victims = [p for d in ("dev-0001", "dev-0004") for p in _pids("worker", rabbitmq_url, d)]
            assert len(victims) == 2, victims
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            fleet.mark(f"SIGKILL workers {victims}")
            # Then the launcher restarts them and finishes the run (it used to give up with status 1)
            assert launcher.wait(timeout=WAIT_S) == 0, (fleet.logs / "launcher.log").read_text()
        finally:
            if launcher.poll() is None:
                launcher.kill()
        report = json.loads((fleet.out / "report.json").read_text(encoding="utf-8"))
        said = (fleet.logs / "launcher.log").read_text(encoding="utf-8", errors="replace")
        for device in ("dev-0001", "dev-0004"):
            assert f"worker-{device} exited with status -9; restarting it" in said, said
        # ... with the same result, every update counted once and every round aggregated once
        check_completed(report)
        accounting = check_accounting(fleet, report)
        assert accounting.empty == 0  # the restarted workers trained their devices' tasks
        for r in range(1, MAX_ROUNDS + 1):
            info = fleet.store.get_round(run_id, r)
            assert info is not None and info.status == "aggregated" and info.global_version == r
        check_accuracy(report, baseline)
        check_task_queues_empty(fleet)


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_the_run_rides_out_a_restart_of_an_append_only_redis(
    baseline: Baseline, rabbitmq_url: str, run_id: str, tmp_path: Path
) -> None:
    redis_server = PrivateRedis(tmp_path / "redis", appendonly=True)  # as compose runs Redis
    (tmp_path / "redis").mkdir()
    redis_server.start()
    try:
        with fleet_of(tmp_path / "run", run_config(run_id), rabbitmq_url, redis_server.url) as fleet:
            fleet.start_run(workers=device_ids())
            # When Redis is shut down mid-round and started again 4 s later
            fleet.wait_round(2)  # open, tasks out (a wider window than a first update)
            redis_server.stop()
            fleet.mark("redis stopped")
            time.sleep(4.0)
            redis_server.start()
            fleet.mark("redis started again")
            # Then every service waited for it, and the run completes with the fault-free result
            # (before: the orchestrator and the aggregator exited on StateStoreError, workers hung)
            check_resumed_run(fleet, baseline)
    finally:
        redis_server.stop()


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_redis_that_lost_the_run_gets_it_back_from_the_snapshot_and_the_run_completes(
    baseline: Baseline, rabbitmq_url: str, run_id: str, tmp_path: Path
) -> None:
    redis_server = PrivateRedis(tmp_path / "redis", appendonly=False)
    (tmp_path / "redis").mkdir()
    redis_server.start()
    try:
        with fleet_of(tmp_path / "run", run_config(run_id), rabbitmq_url, redis_server.url) as fleet:
            fleet.start_run(workers=device_ids())
            # When a Redis without persistence restarts mid-round (the run's state is gone)
            fleet.wait_round(2)  # open, tasks out (a wider window than a first update)
            redis_server.stop()
            time.sleep(2.0)
            redis_server.start()
            fleet.mark("redis started again, empty")
            # Then the aggregator restores the run from its latest snapshot and the orchestrator goes on
            # from it: the run completes with the fault-free result, every round aggregated once
            # (before: both stopped with the StateLost status; before that, the run began again)
            report = fleet.wait_services_done()
            fleet.wait_workers_done()
            check_completed(report)
            accounting = check_accounting(fleet, report, lost_with_state=True)
            assert accounting.empty == 0
            check_aggregated_once(fleet)
            check_accuracy(report, baseline)
            check_task_queues_empty(fleet)
            assert report["state_restored"] == 1, report["state_restored"]
            said = fleet.services["aggregator"].log.read_text(errors="replace")
            assert "restored from its snapshot" in said, said[-3000:]
    finally:
        redis_server.stop()


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_worker_told_to_stop_mid_task_hands_it_back_and_exits_at_once(
    baseline: Baseline, rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    # Given tasks that each take 7.5 s of (slept) device time: what a scale-down or a pod eviction meets
    config = run_config(run_id, {"devices": {"profile": {"speed": 0.02}}})
    with fleet_of(tmp_path, config, rabbitmq_url, redis_url) as fleet:
        fleet.start_run(workers=device_ids())
        fleet.wait_round(2)
        time.sleep(1.5)  # every worker is inside its round-2 task
        # When one worker gets SIGTERM (what Kubernetes and compose send)
        victim = fleet.services["worker-2"]
        sent = time.monotonic()
        os.kill(victim.proc.pid, signal.SIGTERM)
        code = victim.proc.wait(timeout=60)
        took = time.monotonic() - sent
        fleet.mark(f"worker-2 exited {code} {took:.1f} s after SIGTERM")
        # Then it exits 0 within a few seconds, handing its task back (before: it trained on to the end)
        assert code == 0 and took < 5.0, (code, took)
        assert "handed back for redelivery" in victim.log.read_text(errors="replace")
        # ... and the next worker of that device trains it: nothing lost, the fault-free result
        fleet.start("worker-2", "worker", device="dev-0002")
        check_resumed_run(fleet, baseline)
