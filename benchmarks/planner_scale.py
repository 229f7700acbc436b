"""How long the LEGEND-style planner takes for large fleets (not a test).

    python benchmarks/planner_scale.py

Random fleets (seeded): compute slowdowns 1-8x, links 0.1-10 MB/s, 50-300 samples per device,
MiniLM's 6 blocks and the packaged cost model; every device measured. Median of 5 runs per size.
Writes benchmarks/results/planner_scale.json.
"""

from __future__ import annotations

import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorafleet.devices.costmodel import cost_model_for  # noqa: E402
from orchestrator.capacity import DeviceEstimate  # noqa: E402
from orchestrator.planners.legend import DeviceInput, LegendOptions, SizeModel, plan_legend  # noqa: E402


def fleet(n: int, seed: int) -> list[DeviceInput]:
    rng = random.Random(seed)
    return [
        DeviceInput(
            f"dev-{i:05d}",
            rng.randint(50, 300),
            DeviceEstimate(
                rng.uniform(1, 8), rng.uniform(1e5, 1e7), rng.uniform(1e5, 5e6), rng.uniform(15, 40)
            ),
        )
        for i in range(n)
    ]


def main() -> None:
    cost = cost_model_for("minilm", 6, 384)
    sizes = SizeModel(dict.fromkeys(range(6), 6144), 4000)
    rows = []
    for n in (100, 1_000, 10_000, 20_000):
        devices = fleet(n, seed=n)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            plan = plan_legend(
                devices,
                num_blocks=6,
                cost=cost,
                sizes=sizes,
                options=LegendOptions(top_ranks=(4, 8, 16)),
            )
            times.append(time.perf_counter() - started)
        depths = [len(p.lora.layer_ranks) for p in plan.plans]
        rows.append(
            {
                "devices": n,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "deadline_s": plan.deadline_s,
                "depth_histogram": {d: depths.count(d) for d in sorted(set(depths))},
            }
        )
        print(
            f"{n:>6} devices: median {statistics.median(times):.3f} s (min {min(times):.3f}, "
            f"max {max(times):.3f})"
        )
    out = Path(__file__).resolve().parent / "results" / "planner_scale.json"
    out.parent.mkdir(exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out.write_text(
        json.dumps({"command": command, "configurations_per_device": 18, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
