"""The aggregator's memory through a 100 MB burst of updates (8 messages of 12.5 MB on average).

Runs the burst of tests/integration/test_update_burst.py (``run_burst``): the real orchestrator and
aggregator as OS processes (``python -m lorafleet orchestrator|aggregator``) on a throwaway vhost of
the local RabbitMQ and the local Redis; the benchmark plays eight devices, takes their round-1 tasks
and answers them all at once while the aggregator is stopped (SIGSTOP), so the whole burst waits in
``lf.updates`` when it resumes. Valid updates are 10.5 MB (LoRA rank 256 on query/value of the ten
blocks of a tiny BERT of hidden size 256, float32); the rest are padded past the message limit to
make 100 MB in all. Five valid updates close round 1 (quorum 5 of 8), which the aggregator merges,
checkpoints and evaluates. Its resident memory is read from ``/proc/PID/status``: ``VmRSS`` once
settled before the burst (the baseline; ``VmHWM`` is reset then through ``/proc/PID/clear_refs``),
``VmHWM`` (the peak) and ``VmRSS`` once round 1 is evaluated and the oversize messages are
dead-lettered. The prefetch is the one the broker reports for the aggregator's consumer
(``rabbitmqctl list_consumers``).

    .venv/bin/python benchmarks/update_burst.py --reps 3

Writes ``benchmarks/results/update_burst.json`` (``--out``). Each ``--case`` is
``NAME:LIMIT_MIB:BUFFER_MIB:OVERSIZE`` (OVERSIZE: positions in the burst padded past the limit,
``+``-separated; BUFFER_MIB 0 leaves ``limits.aggregator_buffer_bytes`` out of the configuration,
for a tree that predates it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import write_json  # noqa: E402
from tests.conftest import REDIS_HOST, REDIS_PORT, throwaway_vhost  # noqa: E402
from tests.integration.test_update_burst import (  # noqa: E402
    BURST_BYTES,
    WORKING_SET_MESSAGES,
    Burst,
    burst_fleet,
    describe,
    run_burst,
)

COMMAND = ".venv/bin/python benchmarks/update_burst.py"
RESULTS = Path(__file__).parent / "results"
MiB = 1 << 20
#: the integration test's case, and lorafleet's defaults (16 MiB messages, a 128 MiB buffer)
CASES = ("test:12:48:1+6+7", "defaults:16:128:1+6")


def parse_case(text: str) -> dict[str, Any]:
    name, limit, buffer, oversize = text.split(":")
    return {
        "name": name,
        "max_message_bytes": int(limit) * MiB,
        "buffer_bytes": int(buffer) * MiB or None,
        "oversize": tuple(int(i) for i in oversize.split("+")),
    }


def one(case: dict[str, Any]) -> Burst:
    state = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
    with (
        throwaway_vhost() as broker,
        tempfile.TemporaryDirectory(prefix="lf-burst-") as root,
        burst_fleet(
            Path(root),
            broker,
            state,
            f"b-{uuid.uuid4().hex[:12]}",
            max_message_bytes=case["max_message_bytes"],
            buffer_bytes=case["buffer_bytes"],
        ) as fleet,
    ):
        return run_burst(fleet, oversize=case["oversize"])


def summary(case: dict[str, Any], bursts: list[Burst]) -> dict[str, Any]:
    limit = case["max_message_bytes"]
    prefetch = bursts[0].prefetch
    allowance = WORKING_SET_MESSAGES * limit
    return {
        "case": case["name"],
        "max_message_bytes": limit,
        "aggregator_buffer_bytes": case["buffer_bytes"],
        "oversize_positions": list(case["oversize"]),
        "message_bytes": bursts[0].sizes,
        "burst_bytes": sum(bursts[0].sizes),
        "prefetch": prefetch,
        "limit_x_prefetch_bytes": limit * prefetch,
        "working_set_allowance_bytes": allowance,
        "bound_bytes": limit * prefetch + allowance,
        "baseline_rss_bytes": [b.baseline_rss for b in bursts],
        "peak_increase_bytes": [b.increase for b in bursts],
        "retained_after_bytes": [b.retained for b in bursts],
        "seconds": [round(b.seconds, 2) for b in bursts],
        "dead_letters": [sorted(reason for reason, _ in b.dead) for b in bursts],
        "median_peak_increase_bytes": statistics.median(b.increase for b in bursts),
        "max_peak_increase_bytes": max(b.increase for b in bursts),
        "within_bound": all(b.increase <= limit * b.prefetch + allowance for b in bursts),
        "curves_mib": [_curve(b) for b in bursts],
    }


def _curve(burst: Burst, step_s: float = 0.05) -> list[tuple[float, float]]:
    """The sampled resident memory above the baseline, its highest value in each ``step_s``."""
    peaks: dict[int, int] = {}
    for t, rss in burst.samples:
        slot = int(t / step_s)
        peaks[slot] = max(peaks.get(slot, 0), rss - burst.baseline_rss)
    return [(round(slot * step_s, 2), round(v / MiB, 1)) for slot, v in sorted(peaks.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--case", action="append", help="NAME:LIMIT_MIB:BUFFER_MIB:OVERSIZE (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS / "update_burst.json")
    parser.add_argument("--label", default="", help="what tree this measures (kept in the JSON)")
    args = parser.parse_args()
    cases = [parse_case(c) for c in (args.case or CASES)]
    load_before = os.getloadavg()
    results = []
    for case in cases:
        bursts = []
        for rep in range(args.reps):
            burst = one(case)
            print(f"{case['name']} rep {rep + 1}: {describe(burst)}", flush=True)
            bursts.append(burst)
        results.append(summary(case, bursts))
    assert BURST_BYTES == 100_000_000
    write_json(
        args.out,
        {
            "label": args.label,
            "command": " ".join([COMMAND, *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "torch": torch.__version__,
            "pika": pika.__version__,
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "cases": results,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
