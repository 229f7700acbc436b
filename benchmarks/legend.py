"""LEGEND-style planning against the baselines on SST-2 with heterogeneous devices (not a test).

Every strategy runs embedded over the same devices (three speed tiers: 1x, 2.5x and 6x slower than
this host, 1-20 Mbit/s links, 10% per-round jitter), data shards and seeds. FedLoRA runs first;
the virtual-time budget is ``--budget-factor`` times its virtual time to the target; every other
strategy runs until that budget. Results: benchmarks/results/legend.{json,md,png}.

    python benchmarks/legend.py                # the committed results
    python benchmarks/legend.py --quick        # tiny model, synthetic data: a smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    fleet_section,
    markdown_table,
    model_section,
    plot,
    run_strategy,
    summarise,
    write_json,
)
from benchmarks.references import add_skip_option, bounds_table, reference_rows  # noqa: E402

STRATEGIES = ["fedlora", "legend", "legend_uniform_rank", "legend_fixed_depth", "hetlora", "fedra"]


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "run_id": "bench-legend",
        "seed": args.seed,
        "model": model_section(args),
        "data": {
            "dataset": "synthetic" if args.quick else "sst2",
            "samples_per_device": args.samples_per_device,
            "eval_samples": args.eval_samples,
        },
        "lora": {"rank": 8, "target_modules": ["query", "value"]},
        "legend": {"top_ranks": [4, 8]},  # the same highest rank as FedLoRA: a fair traffic comparison
        "training": {"batch_size": 16, "lr": args.lr},
        "activation_cache": not args.no_cache,
        "devices": fleet_section(args),
    }


def pin_cost_model(runs: Path) -> dict[str, Any]:
    """Every run of the benchmark uses one snapshot of the calibrated cost model."""
    source = Path(__file__).resolve().parents[1] / "lorafleet/devices/costmodels/minilm-cpu.json"
    runs.mkdir(parents=True, exist_ok=True)
    pinned = runs / "cost-model.json"
    shutil.copyfile(source, pinned)
    os.environ["LORAFLEET_COST_MODEL"] = str(pinned)
    return dict(json.loads(pinned.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=21)
    parser.add_argument("--samples-per-device", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=None, help="a seeded subset of the dev set")
    parser.add_argument("--target", type=float, default=0.80)
    parser.add_argument("--fedlora-rounds", type=int, default=8)
    parser.add_argument("--max-rounds", type=int, default=40)
    parser.add_argument("--budget-factor", type=float, default=1.25)
    parser.add_argument("--budget-virtual-s", type=float, default=None)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--no-cache", action="store_true", help="workers do not use the activation cache")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--quick", action="store_true")
    add_skip_option(parser)
    parser.add_argument(
        "--add-references",
        action="store_true",
        help="add the reference rows to the committed JSON from its setup (no federated training)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-legend"))
    args = parser.parse_args()
    console = Console(stderr=True)
    if args.add_references:
        add_references(args, console)
        return
    cost_model = pin_cost_model(args.runs)
    base = base_config(args)
    names = args.strategies.split(",")
    started = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    console.print(f"[bold]fedlora[/bold]: {args.fedlora_rounds} rounds to set the budget")
    fed = run_strategy(base, "fedlora", args.runs, max_rounds=args.fedlora_rounds)
    fed_ttt = next((r["virtual_time_s"] for r in fed["rounds"] if (r["accuracy"] or 0) >= args.target), None)
    budget = args.budget_virtual_s or (args.budget_factor * fed_ttt if fed_ttt else fed["virtual_time_s"])
    rows["fedlora"] = summarise(fed, args.target, budget)
    references = (
        reference_rows(base, args.fedlora_rounds, args.runs / "references") if args.references else {}
    )
    write_results(args, base, cost_model, budget, rows, started, partial=True, references=references)
    console.print(
        f"  time to target {fed_ttt}, budget {budget:.1f} virtual s, wall {fed['bench_wall_s']:.0f} s"
    )
    for name in names:
        if name == "fedlora":
            continue
        console.print(f"[bold]{name}[/bold]")
        report = run_strategy(base, name, args.runs, max_rounds=args.max_rounds, virtual_budget_s=budget)
        rows[name] = summarise(report, args.target, budget)
        write_results(args, base, cost_model, budget, rows, started, partial=True, references=references)
        r = rows[name]
        console.print(
            f"  to target {r['time_to_target_virtual_s']} virtual s, at budget {r['accuracy_at_budget']}, "
            f"{r['rounds']} rounds, wall {r['wall_s']:.0f} s"
        )
    table = write_results(args, base, cost_model, budget, rows, started, partial=False, references=references)
    console.print(table)


def add_references(args: argparse.Namespace, console: Console) -> None:
    """Add the centralized and local-only rows to the committed JSON, from the setup and FedLoRA
    rounds its command records (nothing federated is trained again)."""
    path = args.out / f"legend{'-quick' if args.quick else ''}.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    words = shlex.split(result["command"])
    rounds = int(words[words.index("--fedlora-rounds") + 1]) if "--fedlora-rounds" in words else 8
    references = reference_rows(result["setup"], rounds, args.runs / "references", resume=True)
    console.print(", ".join(f"{n} {r['final_accuracy']:.4f}" for n, r in references.items()))
    args.target = result["target"]
    write_results(
        args,
        result["setup"],
        result["cost_model"],
        result["budget_virtual_s"],
        result["strategies"],
        time.perf_counter() - float(result["wall_s"]),
        partial=bool(result["partial"]),
        references=references,
        command=result["command"],  # the command that measured the federated rows
        references_command="python " + " ".join(shlex.quote(a) for a in sys.argv),
    )


def write_results(
    args: argparse.Namespace,
    base: dict[str, Any],
    cost_model: dict[str, Any],
    budget: float,
    rows: dict[str, dict[str, Any]],
    started: float,
    *,
    partial: bool,
    references: dict[str, dict[str, Any]],
    command: str | None = None,
    references_command: str | None = None,
) -> str:
    """Write JSON, markdown and PNG (after every strategy, so an interrupted run keeps what it did)."""
    command = command or "python " + " ".join(shlex.quote(a) for a in sys.argv)
    suffix = "-quick" if args.quick else ""
    result = {
        "command": command,
        "target": args.target,
        "budget_virtual_s": budget,
        "partial": partial,
        "activation_cache": not args.no_cache,
        "virtual_clock": (
            "calibrated cost model (lorafleet/costmodels/minilm-cpu.json) counting what a device "
            + ("with the same activation cache" if not args.no_cache else "without an activation cache")
            + " computes, / device speed x jitter, + bytes / bandwidth"
        ),
        "setup": base,
        "cost_model": cost_model,
        "wall_s": time.perf_counter() - started,
        "strategies": rows,
        "references": references,
    } | ({"references_command": references_command} if references_command else {})
    write_json(args.out / f"legend{suffix}.json", result)
    table = markdown_table(rows, "fedlora")
    (args.out / f"legend{suffix}.md").write_text(
        f"# LEGEND-style vs baselines\n\n`{command}`\n\ntarget {args.target}, budget {budget:.1f} virtual s, "
        f"benchmark wall time {result['wall_s']:.0f} s{' (partial)' if partial else ''}\n\n{table}\n\n"
        f"{bounds_table(references, rows)}\n",
        encoding="utf-8",
    )
    plot(
        rows,
        args.target,
        budget,
        args.out / f"legend{suffix}.png",
        "SST-2, 3 device tiers: accuracy vs virtual time",
    )
    return table


if __name__ == "__main__":
    main()
