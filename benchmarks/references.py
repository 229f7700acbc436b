"""The bounds a federated benchmark row sits between: centralized LoRA and local-only LoRA.

* **centralized** (the ceiling): one device holding the pooled rows of every device of the benchmark's
  fleet, FedLoRA's LoRA (every block, full rank), for as many rounds of ``training.local_epochs`` as
  FedLoRA ran: every row takes the same number of gradient steps as under FedLoRA, with no
  heterogeneity and no averaging; the ceiling is its best evaluated round.
* **local-only** (the floor): each device alone on its own rows, the same steps (FedLoRA's rounds x
  local epochs, as one round), evaluated on the same evaluation rows; the row gives the mean over the
  devices (and the spread): what a device gets without federating. With ``local_devices`` a seeded
  sample of that many devices stands for the fleet (each costs a whole evaluation; the row says so).

Both run through the product (``run_embedded``): the pooled rows and each device's rows are written as
JSON-lines files of labelled rows (``data.path`` with ``data.labels``) taken from the benchmark's own
partition, so the reference sees exactly the rows the federated devices held.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

from benchmarks.harness import run_strategy
from lorafleet.data.datasets import TextDataset, load_train, partition_rows
from lorafleet.data.labels import label_names
from schemas.config import merge_overrides, parse_run_config

#: the reference rows' names, in table order (ceiling first)
REFERENCES = ("centralized", "local_only")


def add_skip_option(parser: argparse.ArgumentParser) -> None:
    """``--no-references`` (``args.references`` False): a benchmark run without the reference rows."""
    parser.add_argument(
        "--no-references",
        dest="references",
        action="store_false",
        help="skip the centralized (ceiling) and local-only (floor) rows",
    )


def write_rows(path: Path, rows: TextDataset, names: list[str]) -> Path:
    """``rows`` as a JSON-lines file of ``{"text", "label"}`` objects (label by class name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": t, "label": names[y]}) for t, y in zip(rows.texts, rows.labels, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _one_device(base: dict[str, Any], path: Path, names: list[str], epochs: int) -> dict[str, Any]:
    """``base`` as one device training on the labelled rows of ``path`` (every row, one tier)."""
    fastest = max(base["devices"]["tiers"], key=lambda t: t["speed"]) if "tiers" in base["devices"] else None
    devices: dict[str, Any] = {"count": 1, "jitter": 0.0}
    if fastest is not None:
        devices["tiers"] = [fastest | {"fraction": 1.0}]
    raw = merge_overrides(
        base,
        {
            "data": {"path": str(path), "labels": names, "partition": "iid", "samples_per_device": None},
            "training": {"local_epochs": epochs},
        },
    )
    raw["devices"] = devices
    return raw


def reference_rows(
    base: dict[str, Any],
    rounds: int,
    runs: Path,
    *,
    resume: bool = False,
    local_devices: int | None = None,
) -> dict[str, dict[str, Any]]:
    """The centralized and local-only rows for the fleet and data of ``base`` (a benchmark's run
    configuration) and FedLoRA's ``rounds``; each row has ``final_accuracy``, ``best_accuracy``,
    ``wall_s`` and what it ran (``steps_per_row``: gradient passes over each row)."""
    config = parse_run_config(base, source="benchmark reference")
    names = label_names(config)
    if names is None:
        raise ValueError("reference rows are for classification runs (labels by name)")
    train = load_train(config)
    shards = partition_rows(train, config)
    epochs = config.training.local_epochs
    steps = rounds * epochs
    pooled = write_rows(runs / "pooled.jsonl", train.subset(sorted(i for s in shards for i in s)), names)
    central = run_strategy(
        _one_device(base, pooled, names, epochs) | {"run_id": "bench-centralized"},
        "fedlora",
        runs / "centralized",
        resume=resume,
        max_rounds=rounds,
    )
    rows = {
        "centralized": {
            "final_accuracy": central["final_accuracy"],
            "best_accuracy": max(
                (r["accuracy"] for r in central["rounds"] if r["accuracy"] is not None), default=None
            ),
            "rows": sum(len(s) for s in shards),
            "steps_per_row": steps,
            "curve": [[r["round"], r["accuracy"]] for r in central["rounds"] if r["accuracy"] is not None],
            "wall_s": float(central.get("bench_wall_s") or 0.0),  # a reused run's own wall time
        }
    }
    accuracies = []
    wall = 0.0
    chosen = range(len(shards))
    if local_devices is not None and local_devices < len(shards):
        chosen = sorted(random.Random(config.seed).sample(range(len(shards)), local_devices))
    for d in chosen:
        shard = shards[d]
        path = write_rows(runs / "local" / f"device-{d:04d}.jsonl", train.subset(shard), names)
        report = run_strategy(
            _one_device(base, path, names, steps) | {"run_id": f"bench-local-{d:04d}"},
            "fedlora",
            runs / "local" / f"device-{d:04d}",
            resume=resume,
            max_rounds=1,
        )
        accuracies.append(float(report["final_accuracy"]))
        wall += float(report.get("bench_wall_s") or 0.0)
    rows["local_only"] = {
        "final_accuracy": statistics.fmean(accuracies),
        "best_accuracy": max(accuracies),
        "min_accuracy": min(accuracies),
        "device_accuracies": accuracies,
        "devices": list(chosen),
        "fleet": len(shards),
        "steps_per_row": steps,
        "wall_s": wall,
    }
    return rows


def bounds_table(references: dict[str, dict[str, Any]], federated: dict[str, dict[str, Any]]) -> str:
    """The reference rows as a markdown table, and where the best federated row at the budget sits."""
    if not references:
        return ""
    lines = ["| reference | accuracy | what |", "|---|---|---|"]
    central = references.get("centralized")
    local = references.get("local_only")
    if central:
        lines.append(
            f"| centralized (ceiling) | {_ceiling(central):.4f} | {central['rows']} pooled rows, one device, "
            f"every block, {central['steps_per_row']} passes over each row; its best round (final "
            f"{central['final_accuracy']:.4f}) |"
        )
    if local:
        n = len(local["device_accuracies"])
        fleet = local.get("fleet", n)
        who = f"{n} devices" if n == fleet else f"{n} devices (a seeded sample of the {fleet})"
        lines.append(
            f"| local-only (floor) | {local['final_accuracy']:.4f} | mean of {who} each alone on its "
            f"own rows, {local['steps_per_row']} passes over each row (devices {local['min_accuracy']:.4f}-"
            f"{local['best_accuracy']:.4f}) |"
        )
    if federated and central and local:
        name, row = max(federated.items(), key=lambda kv: kv[1]["accuracy_at_budget"])
        acc = row["accuracy_at_budget"]
        low, high = local["final_accuracy"], _ceiling(central)
        where = (
            "within the bounds"
            if low <= acc <= high
            else ("above the ceiling" if acc > high else "below the floor")
        )
        share = (
            f", {(acc - low) / (high - low):.0%} of the way from the floor to the ceiling"
            if low <= acc <= high and high > low
            else ""
        )
        lines.append(f"\nBest federated at the budget: {name} {acc:.4f}, {where}{share}.")
    return "\n".join(lines)


def _ceiling(central: dict[str, Any]) -> float:
    """The centralized run's best evaluated round: with the same steps, centralized training that keeps
    its best epoch (its final one can be past it: 12 AdamW epochs over SST-2's pooled rows ended 6.4
    points below their best)."""
    best = central.get("best_accuracy")
    return float(central["final_accuracy"] if best is None else best)
