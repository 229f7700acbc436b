"""Summed memory of a distributed run on one host (issue 19 part 2): where the PSS goes.

``lorafleet run CONFIG --broker ... --state ...`` starts the orchestrator, the aggregator and one
worker per device as processes of their own (on a throwaway RabbitMQ vhost); this samples every
process of that tree once a second (PSS from ``/proc/PID/smaps_rollup`` through psutil, USS and RSS
beside it) and reports the peak of the summed PSS, with each role's share at that peak.

    .venv/bin/python benchmarks/distributed_memory.py --rounds 1
    .venv/bin/python benchmarks/distributed_memory.py --job flower --rounds 10

``--job flower`` runs issue 19's job (``benchmarks/system.py``'s ``FLOWER_JOB``: 8 worker processes)
in place of ``--config``. Writes ``benchmarks/results/distributed_memory.{json,md}`` (``--job flower``:
``distributed_flower_job.{json,md}``), with the run's wall time, seconds per round and accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.broker_throughput import throwaway_vhost, wait_for_broker  # noqa: E402
from benchmarks.system import FLOWER_JOB  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024


def role(process: psutil.Process) -> str:
    """The process's part: the launcher, a service, a worker, or something else it started."""
    try:
        argv = process.cmdline()
    except psutil.Error:
        return "gone"
    for name in ("orchestrator", "aggregator", "worker"):
        if name in argv:
            return name
    if any("multiprocessing" in arg for arg in argv):
        return "zygote"  # the forkserver (lorafleet/app/zygote.py) and its resource tracker
    return "launcher" if "run" in argv else "other"


def sample(root: psutil.Process, cpu: dict[int, float]) -> dict[str, dict[str, float]]:
    """PSS, USS and RSS in MiB summed per role over ``root`` and its descendants, and their count;
    each process's CPU seconds so far go in ``cpu`` (by pid: the last sample of a process that exits
    stands for it, up to one interval short)."""
    totals: dict[str, dict[str, float]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
            times = process.cpu_times()
        except psutil.Error:
            continue
        cpu[process.pid] = times.user + times.system
        entry = totals.setdefault(role(process), {"processes": 0, "pss": 0.0, "uss": 0.0, "rss": 0.0})
        entry["processes"] += 1
        entry["pss"] += info.pss / MIB
        entry["uss"] += info.uss / MIB
        entry["rss"] += info.rss / MIB
    return totals


def markdown(doc: dict[str, Any]) -> str:
    peak = doc["peak"]
    lines = [
        "# Summed memory of a distributed run on one host",
        "",
        f"Command: `{doc['command']}` ({doc['date']}, {os.cpu_count()} cores; the run: "
        f"`{doc['run_command']}`)",
        "",
        f"Peak summed PSS **{doc['peak_pss_mib']:.0f} MiB** ({doc['peak_pss_mib'] / 1024:.2f} GiB) at "
        f"{doc['peak_at_s']:.0f} s of {doc['wall_s']:.0f} s; samples every {doc['interval_s']} s.",
        "",
        "| role | processes | PSS MiB | USS MiB | RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for name, entry in sorted(peak.items()):
        mib = " | ".join(f"{entry[k]:.0f}" for k in ("pss", "uss", "rss"))
        lines.append(f"| {name} | {entry['processes']} | {mib} |")
    run = doc["run"]
    lines += [
        "",
        f"The run: {run['rounds']} rounds, final accuracy {run['final_accuracy']:.4f}, run wall "
        f"{run['run_wall_s']:.1f} s (round 1 opened to the last round closed and evaluated), "
        f"{run['s_per_round_mean']:.1f} s per round ({run['s_per_round_range'][0]:.1f}-"
        f"{run['s_per_round_range'][1]:.1f}); the command {doc['wall_s']:.1f} s and {doc['cpu_s']:.0f} CPU-s "
        "(every process it started, as last sampled).",
    ]
    return "\n".join(lines) + "\n"


def run_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Wall time, seconds per round and accuracy from the run's ``report.json``."""
    rounds = report["rounds"]
    per_round = [r["round_time_s"] for r in rounds]
    return {
        "rounds": len(rounds),
        "final_accuracy": report["final_accuracy"],
        "run_wall_s": rounds[-1]["wall_time_s"],
        "s_per_round_mean": sum(per_round) / len(per_round),
        "s_per_round_range": [min(per_round), max(per_round)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="examples/quickstart.yaml")
    parser.add_argument("--job", choices=["config", "flower"], default="config", help="flower: issue 19 job")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--state", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--work", type=Path, default=Path("runs/distributed_memory"))
    parser.add_argument("--interval-s", type=float, default=1.0)
    args = parser.parse_args()
    stem, config = "distributed_memory", args.config
    if args.job == "flower":
        stem, config = "distributed_flower_job", str(args.work / "flower_job.yaml")
        args.work.mkdir(parents=True, exist_ok=True)
        Path(config).write_text(yaml.safe_dump(FLOWER_JOB), encoding="utf-8")
    with throwaway_vhost(args.host, args.port) as broker:
        wait_for_broker(broker)
        command = [sys.executable, "-m", "lorafleet", "run", config, "--out", str(args.work), "-q"]
        command += ["--broker", broker, "--state", args.state, "--set", f"rounds.max_rounds={args.rounds}"]
        started, cpu_by_pid = time.monotonic(), dict[int, float]()
        launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        root = psutil.Process(launcher.pid)
        best: tuple[float, float, dict[str, dict[str, float]]] = (0.0, 0.0, {})
        while launcher.poll() is None:
            totals = sample(root, cpu_by_pid)
            pss = sum(entry["pss"] for entry in totals.values())
            if pss > best[0]:
                best = (pss, time.monotonic() - started, totals)
            time.sleep(args.interval_s)
        wall, cpu = time.monotonic() - started, sum(cpu_by_pid.values())
    if launcher.returncode != 0:
        raise SystemExit(f"the run failed with {launcher.returncode}: {' '.join(command)}")
    doc = {
        "command": ".venv/bin/python benchmarks/distributed_memory.py " + " ".join(sys.argv[1:]),
        "run_command": " ".join(["lorafleet", *command[3:]]).replace(broker, "amqp://.../<vhost>"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "interval_s": args.interval_s,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_pss_mib": best[0],
        "peak_at_s": best[1],
        "peak": best[2],
        "run": run_figures(json.loads((args.work / "report.json").read_text(encoding="utf-8"))),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (RESULTS / f"{stem}.md").write_text(markdown(doc), encoding="utf-8")
    print(markdown(doc))


if __name__ == "__main__":
    main()
