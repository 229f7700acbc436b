"""Real heterogeneity: LEGEND-style plans from *measured* device times (issue 16 part 4).

Four real worker processes (``lorafleet worker --data``, ``data.source: local``, so ``devices.emulate``
is false and the workers report measured seconds and calibrate at registration), on a real RabbitMQ
(a throwaway vhost) and Redis: three pinned together on one core (``taskset -c 0``: each gets about a
third of it) and one alone on another (``taskset -c 1``). The orchestrator and the aggregator are not
pinned (``--server-cpus`` pins them). Two runs on the same device files and seed:

* ``legend`` (LEGEND-style: depth and rank per device from the capacity estimates);
* ``fedlora`` (every device the same LoRA on all blocks).

The check: under LEGEND the lone worker (``dev-0003``) gets a deeper LoRA than each of the three that
share a core, from the first round on (the calibration) and in every round; ``report.json`` says
``"times": "measured"``; and LEGEND's wall seconds to FedLoRA's final accuracy against FedLoRA's own
(``time_to_fedlora_final``: None when LEGEND never got there).

Each device's rows are an IID share of SST-2's train split (``--samples`` each), written as JSONL
(``text``, ``label``) under ``--work``; the aggregator evaluates on ``--eval-samples`` dev rows.

    .venv/bin/python benchmarks/real_heterogeneity.py --rounds 8 --samples 128

Writes ``benchmarks/results/real_heterogeneity.{json,md}``. The wall times mean something only on an
otherwise quiet machine with at least two cores (on a shared one other work lands on the pinned
cores too: the script records the load average before and after each run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.broker_throughput import throwaway_vhost, wait_for_broker  # noqa: E402
from benchmarks.harness import write_json  # noqa: E402
from lorafleet.data.datasets import load_train, partition_rows  # noqa: E402
from schemas.config import device_id, parse_run_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PINNED = ["dev-0000", "dev-0001", "dev-0002"]  # three workers on one core
LONE = "dev-0003"  # one worker alone on another core
SST2_LABELS = ["negative", "positive"]


def run_config(strategy: str, run_id: str, args: argparse.Namespace) -> dict[str, Any]:
    """The run's configuration: SST-2 rows on the devices (data.source local: measured times)."""
    return {
        "run_id": run_id,
        "seed": args.seed,
        "strategy": strategy,
        "model": {"name": args.model, "max_seq_len": args.seq_len},
        "data": {
            "dataset": "sst2",
            "source": "local",
            "labels": SST2_LABELS,
            "eval_samples": args.eval_samples,
        },
        "devices": {"count": 1 + len(PINNED), "calibration_steps": args.calibration_steps},
        "lora": {"rank": 8},
        "legend": {"decay": args.decay},
        "training": {"lr": args.lr, "local_epochs": 1, "batch_size": 16},
        "rounds": {
            "max_rounds": rounds(strategy, args),
            "round_deadline_s": 3600.0,
            "registration_timeout_s": 900.0,
        },
        "security": {"require_signatures": False},
    }


def rounds(strategy: str, args: argparse.Namespace) -> int:
    """LEGEND-style rounds are shorter (shallower LoRA on the crowded devices): it gets ``--legend-rounds``
    (default twice ``--rounds``) to show when it reaches FedLoRA's final accuracy, if it does."""
    return (args.legend_rounds or 2 * args.rounds) if strategy == "legend" else args.rounds


def write_device_files(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """An IID share of SST-2's train split per device, as JSONL rows ``{"text", "label"}``."""
    central = parse_run_config(
        {
            "seed": args.seed,
            "data": {"dataset": "sst2", "samples_per_device": args.samples},
            "devices": {"count": 1 + len(PINNED)},
        }
    )
    train = load_train(central)
    files = {}
    for index, rows in enumerate(partition_rows(train, central)):
        path = work / f"{device_id(index)}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for i in rows:
                f.write(json.dumps({"text": train.texts[i], "label": train.labels[i]}) + "\n")
        files[device_id(index)] = path
    return files


def _lorafleet(*argv: str, cpus: str | None, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "lorafleet", *argv]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def run_once(
    strategy: str, args: argparse.Namespace, broker: str, files: dict[str, Path], work: Path
) -> dict[str, Any]:
    """One distributed run; its report.json, with the load average around it."""
    run_id = f"realhet-{strategy}-{uuid.uuid4().hex[:6]}"
    out = work / strategy
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "run.json"  # JSON is YAML
    cfg_path.write_text(json.dumps(run_config(strategy, run_id, args), indent=2), encoding="utf-8")
    load_before = os.getloadavg()
    started = time.monotonic()
    common = ("--broker", broker)
    servers = [
        _lorafleet(
            role,
            str(cfg_path),
            *common,
            "--state",
            args.state,
            "--out",
            str(out if role == "orchestrator" else out / role),  # both write report files
            cpus=args.server_cpus,
            log=out / f"{role}.log",
        )
        for role in ("orchestrator", "aggregator")
    ]
    workers = [
        _lorafleet(
            "worker",
            str(cfg_path),
            *common,
            "--device-id",
            d,
            "--data",
            str(files[d]),
            "--threads",
            "1",
            cpus=args.lone_cpu if d == LONE else args.pinned_cpu,
            log=out / f"{d}.log",
        )
        for d in [*PINNED, LONE]
    ]
    try:
        for p in servers:
            p.wait(timeout=args.timeout_s)
    finally:
        for p in [*servers, *workers]:
            if p.poll() is None:
                p.terminate()
        for p in [*servers, *workers]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    report: dict[str, Any] = json.loads((out / "report.json").read_text(encoding="utf-8"))
    report["_bench"] = {
        "elapsed_s": time.monotonic() - started,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    return report


def lone_deeper(report: dict[str, Any]) -> list[bool]:
    """Per round: the lone device's LoRA deeper than every pinned device's (False if it is missing)."""
    out = []
    for r in report["rounds"]:
        depths = r.get("depths") or {}
        lone = depths.get(LONE)
        pinned = [depths[d] for d in PINNED if d in depths]
        out.append(lone is not None and bool(pinned) and all(lone > p for p in pinned))
    return out


def wall_to_accuracy(report: dict[str, Any], target: float) -> float | None:
    """Wall seconds of the first round at or above ``target`` (None: never)."""
    for r in report["rounds"]:
        if r.get("accuracy") is not None and r["accuracy"] >= target:
            return float(r["wall_time_s"])
    return None


def summarise(legend: dict[str, Any], fedlora: dict[str, Any]) -> dict[str, Any]:
    target = float(fedlora["final_accuracy"])
    deeper = lone_deeper(legend)
    return {
        "times": {"legend": legend.get("times"), "fedlora": fedlora.get("times")},
        "legend_depths": [r.get("depths") for r in legend["rounds"]],
        "lone_deeper_every_round": all(deeper),
        "lone_deeper_rounds": deeper,
        "fedlora_final_accuracy": target,
        "fedlora_wall_s": fedlora["rounds"][-1]["wall_time_s"],
        "legend_final_accuracy": legend["final_accuracy"],
        "legend_wall_s": legend["rounds"][-1]["wall_time_s"],
        "legend_time_to_fedlora_final": wall_to_accuracy(legend, target),
        "fedlora_time_to_fedlora_final": wall_to_accuracy(fedlora, target),
        "loadavg": {"legend": legend["_bench"], "fedlora": fedlora["_bench"]},
    }


def markdown(summary: dict[str, Any], args: argparse.Namespace) -> str:
    s = summary
    pinned = f"{len(PINNED)} workers on `taskset -c {args.pinned_cpu}`"
    lone = f"{LONE} alone on `taskset -c {args.lone_cpu}`"
    lines = [
        "# Real heterogeneity: LEGEND from measured times",
        "",
        f"Command: `.venv/bin/python benchmarks/real_heterogeneity.py {' '.join(sys.argv[1:])}`",
        "",
        f"{pinned}, {lone}; model {args.model}, {args.samples} SST-2 rows per device, {args.rounds} rounds.",
        "",
        f"* times: {s['times']}",
        f"* LEGEND depths per round: {s['legend_depths']}",
        f"* lone worker deeper in every round: {s['lone_deeper_every_round']}",
        f"* FedLoRA: final accuracy {s['fedlora_final_accuracy']:.4f} at {s['fedlora_wall_s']:.1f} s",
        f"* LEGEND: final accuracy {s['legend_final_accuracy']:.4f} at {s['legend_wall_s']:.1f} s; "
        f"FedLoRA's final accuracy at {s['legend_time_to_fedlora_final']} s",
        f"* load average (1, 5, 15 min) around the runs: {s['loadavg']}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--legend-rounds", type=int, default=None, help="default: twice --rounds")
    parser.add_argument("--samples", type=int, default=128, help="training rows per device")
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decay", type=float, default=0.7, help="legend.decay (LEGEND's utility per block)")
    parser.add_argument("--calibration-steps", type=int, default=3)
    parser.add_argument("--pinned-cpu", default="0")
    parser.add_argument("--lone-cpu", default="1")
    parser.add_argument("--server-cpus", default=None, help="taskset list for orchestrator and aggregator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--state", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per run")
    parser.add_argument("--work", type=Path, default=Path("runs/real_heterogeneity"))
    parser.add_argument("--strategies", default="legend,fedlora")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    files = write_device_files(args, args.work)
    reports = {}
    with throwaway_vhost(args.host, args.port) as broker:
        wait_for_broker(broker)
        for strategy in args.strategies.split(","):
            reports[strategy] = run_once(strategy, args, broker, files, args.work)
            print(f"{strategy}: final accuracy {reports[strategy]['final_accuracy']}", flush=True)
    if {"legend", "fedlora"} <= set(reports):
        summary = summarise(reports["legend"], reports["fedlora"])
        write_json(
            RESULTS / "real_heterogeneity.json", {"args": vars(args) | {"work": str(args.work)}, **summary}
        )
        (RESULTS / "real_heterogeneity.md").write_text(markdown(summary, args), encoding="utf-8")
        print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
