"""Shared harness for the strategy benchmarks: run strategies embedded, summarise, plot.

A strategy's row: virtual time and bytes to the target accuracy (first round at or above it),
accuracy at a fixed virtual-time budget (the last evaluated round whose virtual time is within
it), final accuracy, rounds and wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from lorafleet.app.embedded import run_embedded
from schemas.config import RunConfig, merge_overrides, parse_run_config
from schemas.errors import ConfigError

#: three device tiers: 1x, 2.5x and 6x slower than this host, 20/5/1 Mbit/s up and 20/10/2 down
TIERS: list[dict[str, Any]] = [
    {"name": "fast", "fraction": 1 / 3, "speed": 1.0, "uplink_mbps": 20.0, "downlink_mbps": 20.0},
    {"name": "mid", "fraction": 1 / 3, "speed": 0.4, "uplink_mbps": 5.0, "downlink_mbps": 10.0},
    {"name": "slow", "fraction": 1 / 3, "speed": 1 / 6, "uplink_mbps": 1.0, "downlink_mbps": 2.0},
]


def model_section(args: argparse.Namespace, **minilm: Any) -> dict[str, Any]:
    """The benchmark's model: MiniLM, or with ``--quick`` a 6-block tiny random BERT."""
    if args.quick:
        return {"name": "tiny", "tiny_layers": 6, "tiny_hidden": 32, "torch_threads": args.threads}
    return {"name": "minilm", "torch_threads": args.threads, **minilm}


def fleet_section(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark's devices: ``--devices`` in the three speed tiers, 10% jitter."""
    return {"count": args.devices, "jitter": 0.1, "tiers": TIERS}


def run_strategy(
    base: dict[str, Any], strategy: str, out_dir: Path, *, resume: bool = False, **rounds: Any
) -> dict[str, Any]:
    """Run one strategy embedded; returns its report with ``bench_wall_s`` added.

    With ``resume``, a finished run's ``report.json`` under ``out_dir`` whose configuration equals
    this one is reused instead of training again (its own wall time stands for ``bench_wall_s``).
    """
    raw = merge_overrides(
        base,
        {
            "strategy": strategy,
            "run_id": f"{base.get('run_id', 'bench')}-{strategy}".replace("_", "-"),
            "rounds": rounds,
        },
    )
    config = parse_run_config(raw, source=f"benchmark {strategy}")
    previous = out_dir / strategy / "report.json"
    if resume and previous.exists():
        report: dict[str, Any] = json.loads(previous.read_text(encoding="utf-8"))
        if _comparable(_settled(report.get("config"))) == _comparable(_settled(config)):
            report["bench_wall_s"] = report.get("wall_time_s")
            return report
    started = time.perf_counter()
    report = run_embedded(config, out_dir / strategy, quiet=True)
    report["bench_wall_s"] = time.perf_counter() - started
    return report


def _settled(config: RunConfig | dict[str, Any] | None) -> dict[str, Any] | None:
    """A configuration as JSON with its ``auto`` merge coverage settled: a run recorded before the
    setting was ``auto`` (0 then) equals a run of today's default that means the same."""
    if config is None:
        return None
    if isinstance(config, dict):
        try:
            config = parse_run_config(config, source="a finished run's report.json")
        except ConfigError:  # recorded under a schema since changed: not today's run
            return config
    return config.model_dump(mode="json") | {"aggregation_coverage": config.coverage}


def _comparable(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A configuration with its virtual budget rounded to a millisecond: the budget is another
    run's virtual time, a float that can differ in its last digits between otherwise equal runs."""
    if config is None:
        return None
    budget = (config.get("rounds") or {}).get("virtual_budget_s")
    if budget is None:
        return config
    return config | {"rounds": config["rounds"] | {"virtual_budget_s": round(float(budget), 3)}}


def summarise(report: dict[str, Any], target: float, budget_virtual_s: float) -> dict[str, Any]:
    rounds = [r for r in report["rounds"] if r["accuracy"] is not None]
    reached = next((r for r in rounds if r["accuracy"] >= target), None)
    spent = 0
    bytes_to_target = None
    for r in report["rounds"]:
        spent += r["bytes_up"] + r["bytes_down"]
        if reached is not None and r["round"] == reached["round"]:
            bytes_to_target = spent
    within = [r for r in rounds if r["virtual_time_s"] <= budget_virtual_s + 1e-9]
    return {
        "time_to_target_virtual_s": None if reached is None else reached["virtual_time_s"],
        "time_to_target_wall_s": None if reached is None else reached["wall_time_s"],
        "bytes_to_target": bytes_to_target,
        "round_to_target": None if reached is None else reached["round"],
        "accuracy_at_budget": within[-1]["accuracy"] if within else 0.0,
        "final_accuracy": report["final_accuracy"],
        "best_accuracy": max((r["accuracy"] for r in rounds), default=None),
        "rounds": len(report["rounds"]),
        "virtual_time_s": report["virtual_time_s"],
        "bytes_total": report["bytes_total"],
        "wall_s": report.get("bench_wall_s"),
        "mean_depth": _mean_depth(report),
        "curve": [[r["virtual_time_s"], r["accuracy"]] for r in rounds],
    }


def _mean_depth(report: dict[str, Any]) -> float | None:
    depths = [d for r in report["rounds"] for d in (r.get("depths") or {}).values()]
    return sum(depths) / len(depths) if depths else None


def plot(rows: dict[str, dict[str, Any]], target: float, budget: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in rows.items():
        xs = [p[0] for p in row["curve"]]
        ys = [p[1] for p in row["curve"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
    ax.axvline(budget, color="grey", linestyle=":", linewidth=1, label="budget")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("dev accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(rows: dict[str, dict[str, Any]], baseline: str) -> str:
    base = rows.get(baseline, {})
    lines = [
        "| strategy | virtual s to target | speedup | MB to target | traffic saved | acc at budget "
        "| final acc | rounds | mean depth | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        ttt, bt = row["time_to_target_virtual_s"], row["bytes_to_target"]
        speed = (base.get("time_to_target_virtual_s") or 0) / ttt if ttt else None
        saved = 1 - bt / base["bytes_to_target"] if bt and base.get("bytes_to_target") else None
        depth = row.get("mean_depth")
        mb = bt / 1e6 if bt else None
        pct = saved * 100 if saved is not None else None
        lines.append(
            f"| {name} | {_f(ttt, 1)} | {_f(speed, 2, 'x')} | {_f(mb, 1)} | "
            f"{_f(pct, 1, '%')} | {_f(row['accuracy_at_budget'], 4)} | "
            f"{_f(row['final_accuracy'], 4)} | {row['rounds']} | {_f(depth, 2)} | {_f(row['wall_s'], 0)} |"
        )
    return "\n".join(lines)


def _f(value: float | None, digits: int, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
