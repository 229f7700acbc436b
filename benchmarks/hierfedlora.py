"""HierFedLoRA-style hierarchical runs against the baselines under non-IID data (not a test).

For every (dataset, Dirichlet alpha) pair, every strategy runs embedded over the same devices (three
speed tiers: 1x, 2.5x and 6x slower than this host, 1-20 Mbit/s links, 10% per-round jitter),
shards and seeds. FedLoRA runs first, for ``--fedlora-rounds`` rounds: its final accuracy is the
run's target and its virtual time the budget; every other strategy runs until that budget.
``hierfedlora`` is HierFedLoRA-style as configured by default (``hier.within_group: uniform``, one
depth per group); ``hierfedlora_legend`` adds LEGEND-style depths within groups (``legend``), the
combination; ``hierfedlora_contributor_only`` is the ``hierfedlora`` row merged with
``aggregation_coverage: 0`` (the default, ``auto``, is 1 for hierarchical strategies) and
``legend_coverage`` the ``legend`` row with 1, ``hierfedlora_unclipped`` the ``hierfedlora`` row
without ``--max-grad-norm`` (``legend_unclipped`` and ``legend_coverage_unclipped`` the flat ones);
the ablations vary one thing from the ``hierfedlora`` row. Every pair's table also has the reference
rows (benchmarks/references.py): centralized LoRA on the pooled rows (the ceiling) and each device
alone (the floor). Results:
benchmarks/results/NAME.{json,md,png} (``--name``, default ``hierfedlora``); each file's command says
how it was made: ``hierfedlora`` is 21 devices, ``hierfedlora-80`` the paper's scale (80 devices,
``hier.groups: auto``).

    python benchmarks/hierfedlora.py --quick      # tiny model, synthetic data: a smoke run
    python benchmarks/hierfedlora.py --add-references   # the reference rows for a committed JSON
"""

from __future__ import annotations

import argparse
import json
import shlex
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
    run_strategy,
    summarise,
    write_json,
)
from benchmarks.legend import pin_cost_model  # noqa: E402
from benchmarks.references import add_skip_option, bounds_table, reference_rows  # noqa: E402
from schemas.config import merge_overrides  # noqa: E402

#: the overrides of a row without the benchmark's gradient clipping
UNCLIPPED: dict[str, Any] = {"training": {"max_grad_norm": None}}

#: benchmark row -> (strategy, configuration overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedlora": ("fedlora", {}),
    "legend": ("legend", {}),
    "hierfedlora": ("hierfedlora", {"hier": {"within_group": "uniform"}}),
    "hierfedlora_legend": ("hierfedlora", {"hier": {"within_group": "legend"}}),
    # the hierfedlora row merged contributor-only (aggregation_coverage 0, the default before it was
    # auto): how the committed tables up to 2026-12-04 measured every hierarchical row
    "hierfedlora_contributor_only": (
        "hierfedlora",
        {"hier": {"within_group": "uniform"}, "aggregation_coverage": 0.0},
    ),
    # the hierfedlora row without the benchmark's gradient clipping: stable without it?
    "hierfedlora_unclipped": ("hierfedlora", {"hier": {"within_group": "uniform"}} | UNCLIPPED),
    # flat LEGEND-style with the coverage-weighted merge the hierarchical rows have by default: is a
    # hierarchical row's lead the hierarchy's or the merge's?
    "legend_coverage": ("legend", {"aggregation_coverage": 1.0}),
    # the two flat LEGEND-style rows without clipping: beside hierfedlora_unclipped, the comparison
    # in the regime where the hierarchy needs no clipping
    "legend_unclipped": ("legend", UNCLIPPED),
    "legend_coverage_unclipped": ("legend", {"aggregation_coverage": 1.0} | UNCLIPPED),
    # the combination (each member as deep as its share of the period allows) without clipping: the
    # hierarchy's depth is what the flat unclipped rows lead on (mean depth 3.96 against 1.67)
    "hierfedlora_legend_unclipped": ("hierfedlora", {"hier": {"within_group": "legend"}} | UNCLIPPED),
    # groups of similar speed (speed_weight 1 and 3 against the 0.1 every other row pins; 3 is the
    # configuration's default since 2026-12-05): a group moves at its slowest member's pace, so only
    # speed-similar groups let fast groups aggregate more often
    "hierfedlora_speed1_unclipped": ("hierfedlora", {"hier": {"speed_weight": 1.0}} | UNCLIPPED),
    "hierfedlora_speed3_unclipped": ("hierfedlora", {"hier": {"speed_weight": 3.0}} | UNCLIPPED),
    "hierfedlora_speed3": ("hierfedlora", {"hier": {"speed_weight": 3.0}}),
    # speed-similar groups planned deeper (the depth utility's decay 0.9 against 0.7), unclipped
    "hierfedlora_speed3_deep_unclipped": (
        "hierfedlora",
        {"hier": {"speed_weight": 3.0}, "legend": {"decay": 0.9}} | UNCLIPPED,
    ),
    "hier_no_grouping": ("hier_no_grouping", {}),
    "hier_fixed_frequency": ("hier_fixed_frequency", {}),
    "hier_fixed_depth": ("hier_fixed_depth", {}),
}


def base_config(args: argparse.Namespace, dataset: str, alpha: float) -> dict[str, Any]:
    return {
        "run_id": "bench-hier",
        "seed": args.seed,
        "model": model_section(args, max_seq_len=args.max_seq_len),
        "data": {
            "dataset": "synthetic" if args.quick else dataset,
            "samples_per_device": args.samples_per_device,
            "eval_samples": args.eval_samples,
            "partition": "dirichlet",
            "alpha": alpha,
        },
        "aggregation_coverage": args.coverage,
        "lora": {"rank": 8, "target_modules": ["query", "value"]},
        "legend": {"top_ranks": [4, 8]},
        # the ablations vary one thing from the hierfedlora row (one depth per group, the
        # configuration's default); hierfedlora_legend is the combination
        # speed_weight 0.1, the configuration's default until 2026-12-05, so that the committed rows
        # stay what they measured; the hierfedlora_speed3 rows are today's default
        "hier": {
            "groups": args.groups,
            "max_frequency": args.max_frequency,
            "within_group": "uniform",
            "speed_weight": 0.1,
        },
        "training": {
            "batch_size": 16,
            "lr": args.lr,
            "optimizer": args.optimizer,
            "local_epochs": args.local_epochs,
            "max_grad_norm": args.max_grad_norm,
        },
        "devices": fleet_section(args),
    }


def run_pair(
    args: argparse.Namespace, dataset: str, alpha: float, names: list[str], console: Console, done: list[Any]
) -> dict[str, Any]:
    base = base_config(args, dataset, alpha)
    runs = args.runs / f"{dataset}-a{alpha}"
    console.print(f"[bold]{dataset}, alpha {alpha}[/bold]: fedlora for {args.fedlora_rounds} rounds")
    fed = run_strategy(base, "fedlora", runs, resume=args.resume, max_rounds=args.fedlora_rounds)
    target = float(fed["final_accuracy"])
    budget = float(fed["virtual_time_s"])
    entry: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "dataset": dataset,
        "alpha": alpha,
        "target": target,
        "target_is": "FedLoRA's final accuracy",
        "budget_virtual_s": budget,
        # FedLoRA can peak and then fall back under strong skew: how soon each reaches its best too
        "fedlora_best": max((r["accuracy"] for r in fed["rounds"] if r["accuracy"] is not None), default=0.0),
        "strategies": {},
    }
    entry["strategies"]["fedlora"] = row_of(fed, entry)
    console.print(f"  target {target:.4f}, budget {budget:.1f} virtual s, wall {fed['bench_wall_s']:.0f} s")
    if args.references:
        entry["references"] = reference_rows(
            base,
            args.fedlora_rounds,
            runs / "references",
            resume=args.resume,
            local_devices=args.local_devices,
        )
        console.print("  references: " + _bounds_line(entry["references"]))
    for name in names:
        if name == "fedlora":
            continue
        strategy, overrides = VARIANTS[name]
        console.print(f"  [bold]{name}[/bold]")
        report = run_strategy(
            merge_overrides(base, overrides) | {"run_id": f"bench-{name}"},
            strategy,
            runs / name,
            resume=args.resume,
            max_rounds=args.max_rounds,
            virtual_budget_s=budget,
        )
        row = entry["strategies"][name] = row_of(report, entry)
        write_results(args, [*done, entry], partial=True)
        console.print(
            f"    to target {row['time_to_target_virtual_s']} virtual s, at budget "
            f"{row['accuracy_at_budget']:.4f}, {row['rounds']} rounds, wall {row['wall_s']:.0f} s"
        )
    return entry


def stem(args: argparse.Namespace) -> str:
    """The results' file name without its suffix: ``--name``, with ``-quick`` for a smoke run."""
    return f"{getattr(args, 'name', 'hierfedlora')}{'-quick' if args.quick else ''}"


def _bounds_line(references: dict[str, Any]) -> str:
    return ", ".join(f"{name} {row['final_accuracy']:.4f}" for name, row in references.items())


def add_references(args: argparse.Namespace, console: Console) -> None:
    """Add the centralized and local-only rows to every pair of the committed JSON, from the setup it
    records (nothing federated is trained again)."""
    path = args.out / f"{stem(args)}.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    setup = argparse.Namespace(**(vars(args) | result["setup"]))
    wanted = {(d, float(a)) for d in args.datasets.split(",") for a in args.alphas.split(",")}
    for entry in result["runs"]:
        if (entry["dataset"], float(entry["alpha"])) not in wanted:
            continue
        base = base_config(setup, entry["dataset"], float(entry["alpha"]))
        runs = args.runs / f"{entry['dataset']}-a{entry['alpha']}" / "references"
        entry["references"] = reference_rows(
            base, int(setup.fedlora_rounds), runs, resume=True, local_devices=args.local_devices
        )
        entry["references_command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        console.print(f"{entry['dataset']}, alpha {entry['alpha']}: " + _bounds_line(entry["references"]))
    args.kept, args.started = [], time.perf_counter() - float(result.get("wall_s", 0.0))
    args.cost_model = result.get("cost_model")
    kept = {k: result[k] for k in ("setup", "ran_as") if k in result}
    write_results(
        args, result["runs"], partial=bool(result.get("partial")), command=result["command"], kept=kept
    )


def row_of(report: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A strategy's row: the harness summary at the run's target and budget, the virtual time and
    bytes to FedLoRA's best accuracy, and (hierarchical runs) the last global round's groups."""
    row = summarise(report, entry["target"], entry["budget_virtual_s"])
    best = summarise(report, entry["fedlora_best"], entry["budget_virtual_s"])
    row["time_to_fedlora_best_virtual_s"] = best["time_to_target_virtual_s"]
    row["bytes_to_fedlora_best"] = best["bytes_to_target"]
    row["groups"] = report["rounds"][-1].get("groups") if report["rounds"] else None
    return row


def rebuild(args: argparse.Namespace) -> None:
    """Recompute the committed JSON's rows from the runs' report.json files (nothing is trained)."""
    path = args.out / f"{stem(args)}.json"
    result = json.loads(path.read_text(encoding="utf-8"))
    for entry in result["runs"]:
        runs = args.runs / f"{entry['dataset']}-a{entry['alpha']}"
        fed = json.loads((runs / "fedlora" / "report.json").read_text(encoding="utf-8"))
        entry["fedlora_best"] = max(
            (r["accuracy"] for r in fed["rounds"] if r["accuracy"] is not None), default=0.0
        )
        for name, old in entry["strategies"].items():
            source = runs / "fedlora" if name == "fedlora" else runs / name / VARIANTS[name][0]
            report = json.loads((source / "report.json").read_text(encoding="utf-8"))
            entry["strategies"][name] = row_of(report, entry) | {"wall_s": old.get("wall_s")}
    args.kept, args.started = [], time.perf_counter() - float(result.get("wall_s", 0.0))
    args.cost_model = result.get("cost_model")
    kept = {k: result[k] for k in ("setup", "ran_as") if k in result}  # the run's, not the rebuild's
    write_results(
        args, result["runs"], partial=bool(result.get("partial")), command=result["command"], kept=kept
    )


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One benchmark JSON from several (parallel processes over one runs directory, one core each).

    Entries are keyed by (dataset, alpha); a later file's row replaces an earlier one of the same
    strategy; rows come out in ``VARIANTS`` order. Rows of one pair must share FedLoRA's target and
    budget (they were measured against the same FedLoRA run), else this raises naming the pair.
    """
    if not results:
        raise ValueError("nothing to merge")
    pairs: dict[tuple[str, float], dict[str, Any]] = {}
    for result in results:
        for entry in result["runs"]:
            key = (entry["dataset"], float(entry["alpha"]))
            have = pairs.get(key)
            if have is None:
                pairs[key] = json.loads(json.dumps(entry))
                continue
            for field in ("target", "budget_virtual_s"):
                if abs(float(have[field]) - float(entry[field])) > 1e-9:
                    raise ValueError(
                        f"{key[0]} alpha {key[1]}: {field} {have[field]} vs {entry[field]} "
                        "(rows measured against different FedLoRA runs)"
                    )
            have["strategies"] |= entry["strategies"]
            have["references"] = have.get("references", {}) | entry.get("references", {})
            have["command"] = entry.get("command") or have.get("command")
    for entry in pairs.values():
        entry["strategies"] = {n: entry["strategies"][n] for n in VARIANTS if n in entry["strategies"]}
        if entry.get("command"):  # the pair's rows again, from the runs directory with --resume
            entry["command"] = _with_strategies(entry["command"], list(entry["strategies"]))
            if entry.get("references"):  # a process measured them: the pair's command makes them too
                entry["command"] = _without_flag(entry["command"], "--no-references")
    runs = sorted(pairs.values(), key=lambda e: (e["dataset"] != "20newsgroups", e["dataset"], e["alpha"]))
    # a cut-short process writes only the rows it finished, so the rows alone say what is missing
    # (a partial file completed by the processes that ran its missing rows is complete)
    complete = all(set(e["strategies"]) == set(VARIANTS) for e in runs)
    ran_as = [
        c
        for r in results
        for c in (
            r["ran_as"].split(" ; ")
            if isinstance(r.get("ran_as"), str)
            else r.get("ran_as") or [r["command"]]
        )
    ]
    datasets = ",".join(dict.fromkeys(e["dataset"] for e in runs))
    alphas = ",".join(dict.fromkeys(str(e["alpha"]) for e in sorted(runs, key=lambda e: e["alpha"])))
    command = _with_strategies(results[0]["command"], None)
    if any(e.get("references") for e in runs):
        command = _without_flag(command, "--no-references")
    command = _with_option(_with_option(command, "--alphas", alphas), "--datasets", datasets)
    names = [n for n in VARIANTS if any(n in e["strategies"] for e in runs)]
    setup = results[0].get("setup", {}) | {  # the merged result's, not the first process's
        "datasets": datasets,
        "alphas": alphas,
        "strategies": ",".join(names),
    }
    return results[0] | {
        "command": command,
        "setup": setup,
        "partial": not complete,
        "wall_s": sum(float(r.get("wall_s", 0.0)) for r in results),
        "ran_as": ran_as,
        "runs": runs,
    }


def _with_option(command: str, flag: str, value: str | None) -> str:
    """``command`` with ``flag``'s value replaced (None: the flag and its value removed)."""
    words = shlex.split(command)
    if flag in words:
        i = words.index(flag)
        del words[i : i + 2]
    if value is not None:
        words[2:2] = [flag, value]  # after "python benchmarks/hierfedlora.py"
    return " ".join(shlex.quote(w) for w in words)


def _without_flag(command: str, flag: str) -> str:
    """``command`` without the option ``flag`` (one that takes no value)."""
    return " ".join(shlex.quote(w) for w in shlex.split(command) if w != flag)


def _with_strategies(command: str, names: list[str] | None) -> str:
    command = _with_option(_with_option(command, "--out", None), "--strategies", None)
    if names is None or set(names) == set(VARIANTS):
        return command
    return command + " --strategies " + ",".join(names)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default="20newsgroups,sst2")
    parser.add_argument("--alphas", default="0.1,0.5")
    parser.add_argument("--devices", type=int, default=21)
    parser.add_argument("--samples-per-device", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=500, help="a seeded subset of the eval split")
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default="adamw",
        help="local optimiser (under strong label skew SGD keeps FedAvg's first-order equivalence)",
    )
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument(
        "--max-grad-norm", type=float, default=None, help="clip local gradients (off by default)"
    )
    parser.add_argument(
        "--groups",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help="hier.groups: a count, or auto (the most near-IID groups, the configuration's default)",
    )
    parser.add_argument(
        "--coverage",
        type=lambda v: v if v == "auto" else float(v),
        default="auto",
        help="aggregation_coverage of every row (auto, the configuration's default: 1 for the hierarchical "
        "strategies, 0 for the flat ones; 0 is how the tables before 2026-12-04 measured)",
    )
    parser.add_argument(
        "--name", default="hierfedlora", help="the results' file name (benchmarks/results/NAME.{json,md,png})"
    )
    parser.add_argument("--max-frequency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fedlora-rounds", type=int, default=12)
    parser.add_argument("--max-rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--strategies", default=",".join(VARIANTS))
    parser.add_argument("--keep-others", action="store_true", help="keep other pairs' committed results")
    parser.add_argument("--rebuild", action="store_true", help="recompute the JSON from the runs' reports")
    parser.add_argument(
        "--resume", action="store_true", help="reuse finished runs whose configuration is unchanged"
    )
    parser.add_argument("--quick", action="store_true")
    add_skip_option(parser)
    parser.add_argument(
        "--local-devices",
        type=int,
        default=None,
        help="the local-only floor over a seeded sample of this many devices (default: every device)",
    )
    parser.add_argument(
        "--add-references",
        action="store_true",
        help="add the reference rows to the pairs of --datasets x --alphas of the committed JSON, from its "
        "setup (no federated training)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="merge these benchmark JSONs (parallel processes) into --out's; nothing is trained",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-hier"))
    args = parser.parse_args()
    if args.rebuild:
        rebuild(args)
        return
    if args.add_references:
        add_references(args, Console(stderr=True))
        return
    if args.merge:
        merged = merge_results([json.loads(p.read_text(encoding="utf-8")) for p in args.merge])
        args.kept, args.started = [], time.perf_counter() - merged["wall_s"]
        args.cost_model = merged.get("cost_model")
        kept = {k: merged[k] for k in ("setup", "ran_as") if k in merged}
        write_results(args, merged["runs"], partial=merged["partial"], command=merged["command"], kept=kept)
        return
    console = Console(stderr=True)
    args.cost_model = pin_cost_model(args.runs)
    args.started = time.perf_counter()
    names = args.strategies.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {sorted(VARIANTS)}")
    done: list[dict[str, Any]] = []
    previous = args.out / f"{stem(args)}.json"
    if args.keep_others and previous.exists():  # runs of other (dataset, alpha) pairs stay
        wanted = {(d, float(a)) for d in args.datasets.split(",") for a in args.alphas.split(",")}
        kept = json.loads(previous.read_text(encoding="utf-8"))["runs"]
        args.kept = [r for r in kept if (r["dataset"], float(r["alpha"])) not in wanted]
    for dataset in args.datasets.split(","):
        for alpha in (float(a) for a in args.alphas.split(",")):
            done.append(run_pair(args, dataset, alpha, names, console, done))
            write_results(args, done, partial=True)
    console.print(write_results(args, done, partial=False))


def write_results(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    *,
    partial: bool,
    command: str | None = None,
    kept: dict[str, Any] | None = None,
) -> str:
    """JSON, markdown and PNG, rewritten after every strategy (an interrupted run keeps what it did)."""
    command = command or "python " + " ".join(shlex.quote(a) for a in sys.argv)
    runs = [*getattr(args, "kept", []), *runs]
    result = {
        "command": command,
        "partial": partial,
        "wall_s": time.perf_counter() - args.started,
        "virtual_clock": (
            "calibrated cost model (lorafleet/costmodels/minilm-cpu.json) counting what a device with the "
            "activation cache computes, / device speed x jitter, + bytes / bandwidth; a global round lasts "
            "as long as its slowest group's intra-group rounds together"
        ),
        "cost_model": args.cost_model,
        "setup": {
            k: v
            for k, v in vars(args).items()
            if k not in ("cost_model", "started", "out", "runs", "kept", "add_references")
        },
        "runs": runs,
    } | (kept or {})
    write_json(args.out / f"{stem(args)}.json", json.loads(json.dumps(result, default=str)))
    parts = [f"# HierFedLoRA-style vs baselines under non-IID data\n\n`{command}`\n"]
    parts.append(f"benchmark wall time {result['wall_s']:.0f} s{' (partial)' if partial else ''}\n")
    for run in runs:
        parts.append(
            f"## {run['dataset']}, Dirichlet alpha {run['alpha']}\n\n`{run.get('command', command)}`\n\n"
            f"target {run['target']:.4f} "
            f"({run['target_is']}), budget {run['budget_virtual_s']:.1f} virtual s\n\n"
            + markdown_table(run["strategies"], "fedlora")
            + "\n\n"
            + best_table(run)
            + "\n\n"
            + held_table(run)
            + "\n"
            + "".join(
                "\n" + table + "\n"
                for table in [bounds_table(run.get("references", {}), run["strategies"])]
                if table
            )
        )
    text = "\n".join(parts)
    (args.out / f"{stem(args)}.md").write_text(text, encoding="utf-8")
    plot_runs(runs, args.out / f"{stem(args)}.png")
    return text


def best_table(run: dict[str, Any]) -> str:
    """Virtual time and traffic to FedLoRA's best accuracy (which can come before its final one)."""
    best = run.get("fedlora_best")
    if best is None:
        return ""
    base = run["strategies"]["fedlora"].get("time_to_fedlora_best_virtual_s")
    cells = []
    for name, row in run["strategies"].items():
        b = row.get("bytes_to_fedlora_best")
        mb_text = "n/a" if b is None else f"{b / 1e6:.1f}"
        cells.append([name, *_time_cells(row.get("time_to_fedlora_best_virtual_s"), base), mb_text])
    return _captioned_table(
        f"FedLoRA's best accuracy {best:.4f}:", ["strategy", "virtual s to it", "speedup", "MB to it"], cells
    )


def _captioned_table(caption: str, columns: list[str], cells: list[list[str]]) -> str:
    """A caption line, then a Markdown table of ``columns`` with one row per entry of ``cells``."""
    lines = [caption, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _time_cells(t: float | None, fedlora_t: float | None) -> tuple[str, str]:
    """A row's virtual seconds and its speedup over FedLoRA's (``n/a`` where either is missing)."""
    t_text = "n/a" if t is None else f"{t:.1f}"
    return t_text, f"{fedlora_t / t:.2f}x" if t and fedlora_t else "n/a"


def held_from(curve: list[list[float]], target: float) -> float | None:
    """The virtual time of the first evaluation from which every later one is at or above ``target``
    (None if the last is below it). Near chance a first crossing can be one lucky evaluation; this
    is when a strategy got there for good."""
    held = None
    for t, accuracy in curve:
        if accuracy < target:
            held = None
        elif held is None:
            held = t
    return held


def held_table(run: dict[str, Any]) -> str:
    """Virtual time from which each strategy stays at or above the target, and its speedup."""
    target = run["target"]
    base = held_from(run["strategies"]["fedlora"]["curve"], target)
    cells = [
        [name, *_time_cells(held_from(row["curve"], target), base)] for name, row in run["strategies"].items()
    ]
    return _captioned_table(
        f"At or above the target ({target:.4f}) from then on:", ["strategy", "virtual s", "speedup"], cells
    )


def plot_runs(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        return
    cols = min(2, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.5 * rows), squeeze=False)
    for ax, run in zip(axes.ravel(), runs, strict=False):
        for name, row in run["strategies"].items():
            # one (colour, line style) per strategy in every panel: ten colours, then dashed, dotted
            index = list(VARIANTS).index(name)
            ax.plot(
                [p[0] for p in row["curve"]],
                [p[1] for p in row["curve"]],
                marker="o",
                markersize=2,
                label=name,
                color=f"C{index % 10}",
                linestyle=("-", "--", ":")[index // 10 % 3],
            )
        ax.axhline(run["target"], color="grey", linestyle="--", linewidth=1)
        ax.axvline(run["budget_virtual_s"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{run['dataset']}, alpha {run['alpha']}")
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(runs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
