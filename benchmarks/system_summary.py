"""Issue 19's figures in one table: ``python benchmarks/system.py --summary``.

Each figure is read from the committed result of the benchmark that measured it, named with that
benchmark's command and date (they ran at different times, on a host whose speed varies from day to
day, so each row says when):

- the Flower job embedded (``system.json``) and distributed with 8 worker processes
  (``distributed_flower_job.json``);
- 1,000 devices on the tiny model and 10,000 with a fake trainer in one process (``scale.json``);
- lorafleet's transport against raw pika, 300 KB updates (``broker_throughput.json``);

and one is measured here, now: the aggregator's time per update, decoding a MiniLM-sized update
(the job's LoRA: r=8 on query/value of 6 blocks, 26 tensors) and folding it into the running weighted
sum (``aggregator/merge/rankwise.py``), over ``--updates`` updates of one round.

Writes ``benchmarks/results/system_summary.{json,md}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from aggregator.merge.rankwise import WeightedUpdate, aggregate
from lorafleet.app.wiring import build_runtime, with_model_defaults
from orchestrator.planners.specs import lora_spec, top_ranks
from schemas.config import parse_run_config
from schemas.tensors import decode_tensors, encode_tensors

RESULTS = Path(__file__).resolve().parent / "results"

#: issue 19's goals
EMBEDDED_S_PER_ROUND, EMBEDDED_WALL_S = 23.0, 250.0
DISTRIBUTED_WALL_S, DISTRIBUTED_PSS_GIB = 280.0, 3.0
OVERHEAD_FRACTION = 0.02
SCALE_PEAK_GIB = 4.0
BROKER_RATIO = 0.8


def aggregation_per_update(job: dict[str, Any], updates: int) -> dict[str, Any]:
    """Seconds per update to decode and fold ``updates`` MiniLM-sized updates into one merge."""
    config = parse_run_config(job)
    runtime = build_runtime(config)
    config = with_model_defaults(config, runtime)
    spec = lora_spec(config.lora, top_ranks(runtime.num_blocks, runtime.num_blocks, config.lora.rank))
    current = runtime.initial_adapter(spec, seed=0)
    bodies = [encode_tensors(runtime.initial_adapter(spec, seed=i + 1)) for i in range(8)]

    def stream() -> Any:
        for i in range(updates):
            yield WeightedUpdate(decode_tensors(bodies[i % len(bodies)]), 500.0)

    aggregate(current, stream())  # warm-up
    started = time.perf_counter()
    aggregate(current, stream())
    seconds = time.perf_counter() - started
    return {
        "updates": updates,
        "tensors": len(current),
        "update_bytes": bodies[0].nbytes,
        "ms_per_update": 1e3 * seconds / updates,
    }


def _goal(figure: str, value: float, relation: str, bound: float, source: str) -> dict[str, Any]:
    met = value <= bound if relation == "<=" else value >= bound
    return {"figure": figure, "value": value, "goal": f"{relation} {bound:g}", "met": met, "source": source}


def _load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
    return loaded


def summary(job: dict[str, Any], updates: int, command: str) -> dict[str, Any]:
    """The figures and the goals they are held to."""
    system = _load("system")
    embedded = min(system["runs"], key=lambda row: row["run_wall_s"])
    distributed = _load("distributed_flower_job")
    scale = _load("scale")
    broker = _load("broker_throughput")
    thousand = next(row for row in scale["rows"] if not row["fake_trainer"])
    fake = next(row for row in scale["rows"] if row["fake_trainer"])
    ratio = broker["summary"]["ratio"]["of_medians"]
    dated = {
        "system": f"system.json ({system['date']})",
        "distributed": f"distributed_flower_job.json ({distributed['date']})",
        "broker": f"broker_throughput.json ({broker['provenance']['date']})",
    }
    pss_gib = distributed["peak_pss_mib"] / 1024
    goals = [
        _goal(
            "embedded s per round", embedded["s_per_round_mean"], "<=", EMBEDDED_S_PER_ROUND, dated["system"]
        ),
        _goal("embedded run wall s", embedded["run_wall_s"], "<=", EMBEDDED_WALL_S, dated["system"]),
        _goal(
            "embedded pipeline overhead",
            embedded["pipeline_overhead_fraction"],
            "<=",
            OVERHEAD_FRACTION,
            dated["system"],
        ),
        _goal(
            "distributed run wall s",
            distributed["run"]["run_wall_s"],
            "<=",
            DISTRIBUTED_WALL_S,
            dated["distributed"],
        ),
        _goal("distributed peak summed PSS GiB", pss_gib, "<=", DISTRIBUTED_PSS_GIB, dated["distributed"]),
        _goal(
            "1,000 devices x 3 rounds, peak GiB",
            thousand["peak_rss_mib"] / 1024,
            "<=",
            SCALE_PEAK_GIB,
            "scale.json",
        ),
        _goal(
            "10,000 devices (fake trainer), rounds", fake["final_round"], ">=", fake["rounds"], "scale.json"
        ),
        _goal("transport / raw pika, updates per s", ratio, ">=", BROKER_RATIO, dated["broker"]),
    ]
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "goals": goals,
        "embedded": embedded,
        "distributed": {key: distributed[key] for key in ("command", "date", "cpu_s", "peak_pss_mib", "run")},
        "scale": scale["rows"],
        "broker": broker["summary"],
        "aggregation": aggregation_per_update(job, updates),
    }


def markdown(doc: dict[str, Any]) -> str:
    agg = doc["aggregation"]
    emb, dist = doc["embedded"], doc["distributed"]
    run = dist["run"]
    lines = [
        "# Issue 19's figures in one table",
        "",
        f"`{doc['command']}` ({doc['date']}): each figure from the committed result named in its row "
        "(the host's speed varies from day to day: compare figures measured on the same day).",
        "",
        "| figure | value | goal | met | from |",
        "|---|---|---|---|---|",
    ]
    for goal in doc["goals"]:
        value = goal["value"]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        lines.append(
            f"| {goal['figure']} | {shown} | {goal['goal']} | {'yes' if goal['met'] else '**no**'} "
            f"| {goal['source']} |"
        )
    lines += [
        "",
        "| the Flower job | final accuracy | run wall s | s per round | CPU s | peak summed PSS MiB |",
        "|---|---|---|---|---|---|",
        f"| embedded, {emb['lanes']} lanes x {emb['threads_per_lane']} thread | {emb['final_accuracy']:.4f} "
        f"| {emb['run_wall_s']:.1f} | {emb['s_per_round_mean']:.1f} | {emb['cpu_s']:.0f} "
        f"| {emb['peak_pss_mib']:.0f} |",
        f"| distributed, 8 worker processes | {run['final_accuracy']:.4f} | {run['run_wall_s']:.1f} "
        f"| {run['s_per_round_mean']:.1f} | {dist['cpu_s']:.0f} | {dist['peak_pss_mib']:.0f} |",
        "",
        "| scale in one process | rounds | process wall s | CPU s | peak RSS MiB | RSS per device KiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in doc["scale"]:
        trainer = "fake trainer" if row["fake_trainer"] else "tiny BERT"
        lines.append(
            f"| {row['devices']:,} devices, {trainer} | {row['final_round']} | {row['process_wall_s']:.1f} "
            f"| {row['cpu_s']:.1f} | {row['peak_rss_mib']:.0f} | {row['rss_per_device_kib']:.1f} |"
        )
    broker = doc["broker"]
    lines += [
        "",
        f"Broker: lorafleet's transport {broker['lorafleet']['median_updates_per_s']:.0f} updates/s against "
        f"raw pika's {broker['raw']['median_updates_per_s']:.0f} (median of the runs; ratio of medians "
        f"{broker['ratio']['of_medians']:.2f}).",
        "",
        f"Aggregation, measured now: {agg['ms_per_update']:.2f} ms per update to decode and fold one "
        f"{agg['update_bytes'] / 1e3:.0f} KB update of {agg['tensors']} tensors into the running weighted "
        f"sum ({agg['updates']} updates of one round).",
    ]
    return "\n".join(lines) + "\n"


def write(job: dict[str, Any], updates: int, command: str) -> str:
    doc = summary(job, updates, command)
    (RESULTS / "system_summary.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    text = markdown(doc)
    (RESULTS / "system_summary.md").write_text(text, encoding="utf-8")
    return text
