"""Accuracy per round of fixed per-device LoRA depth plans on the real-heterogeneity setup (issue 16).

The embedded twin of ``benchmarks/real_heterogeneity.py``'s runs: the same four SST-2 shards of
``--samples`` rows (an IID partition, seed 0), MiniLM at ``max_seq_len`` 64, lr 3e-3, batch 16, one
local epoch, all 872 dev rows evaluated every round. The LEGEND-style planner is replaced by a fixed
plan: ``--depths`` gives each device's depth (devices 0-2 are the three that share a core in the
real run, device 3 the lone one) at top rank ``--top`` with the rising rank profile (``--uniform``:
the top rank on every block). ``fedlora`` as the name runs the FedLoRA strategy itself (its embedded
run reproduces the distributed one's accuracies to the last digit). ``--coverage`` sets
``aggregation_coverage``. Accuracy does not depend on the wall clock, so this answers which plans
can reach FedLoRA's final accuracy at all, in minutes and without pinning processes.

    .venv/bin/python benchmarks/legend_depth_study.py legend-1114 --depths 1,1,1,4 --top 16 --rounds 12

Prints the accuracies and writes ``runs/legend_depth_study/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import orchestrator.planners.legend_strategies as legend_strategies  # noqa: E402
from benchmarks.harness import run_strategy  # noqa: E402
from orchestrator.planners.legend import LegendPlan, rank_template  # noqa: E402
from orchestrator.planners.specs import DevicePlan, lora_spec  # noqa: E402


def fixed_planner(depths: list[int], top: int, uniform: bool) -> Any:
    def plan(devices: Any, *, num_blocks: int, cost: Any, sizes: Any, options: Any, lora: Any) -> LegendPlan:
        opts = replace(options, rank_profile="uniform") if uniform else options
        plans = [
            DevicePlan(
                d.device_id,
                lora_spec(lora, rank_template(depths[int(d.device_id.split("-")[1])], top, num_blocks, opts)),
            )
            for d in devices
        ]
        return LegendPlan(plans, 1.0, {})

    return plan


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="'fedlora' runs the FedLoRA strategy; anything else a fixed plan")
    parser.add_argument("--depths", default="1,1,1,4")
    parser.add_argument("--top", type=int, default=16)
    parser.add_argument("--uniform", action="store_true")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--coverage", type=float, default=0.0)
    parser.add_argument("--runs", type=Path, default=Path("runs/legend_depth_study"))
    args = parser.parse_args()
    depths = [int(x) for x in args.depths.split(",")]
    legend_strategies.plan_legend = fixed_planner(depths, args.top, args.uniform)  # type: ignore[assignment]
    base = {
        "run_id": f"study-{args.name}",
        "seed": 0,
        "model": {"name": "minilm", "max_seq_len": 64, "torch_threads": 1, "lanes": 1},
        "data": {"dataset": "sst2", "samples_per_device": args.samples, "eval_samples": 872},
        "devices": {"count": 4},
        "lora": {"rank": 8},
        "legend": {"decay": 0.9},
        "training": {"lr": args.lr, "local_epochs": 1, "batch_size": 16},
        "aggregation_coverage": args.coverage,
    }
    strategy = "fedlora" if args.name == "fedlora" else "legend"
    report = run_strategy(base, strategy, args.runs / args.name, max_rounds=args.rounds)
    accuracies = [round(r["accuracy"], 4) for r in report["rounds"]]
    print(args.name, depths, args.top, "accuracy per round", accuracies, "best", max(accuracies))
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / f"{args.name}.json").write_text(
        json.dumps({"args": vars(args) | {"runs": str(args.runs)}, "accuracy": accuracies}, indent=2),
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
