"""System speed of the embedded mode on the job of issue 19 (the same FedAvg-LoRA job run in Flower).

MiniLM, LoRA r=8 on query/value of all 6 blocks (dropout 0.05), SST-2, 8 IID devices x 500 rows, 10
rounds x 15 local AdamW steps at batch 16, lr 1e-3, weight decay 0, the full dev set (872 rows)
evaluated every round. This runs it embedded (``run_embedded``, training lanes as configured) and
measures:

- wall: the whole command (model and data loading included) and the run (round 1 opened to the last
  round closed and evaluated); seconds per round (open to close, its evaluation included);
- CPU seconds (this process and its lanes) and the peak of the summed PSS of this process and its
  lanes (psutil, sampled every 0.5 s);
- pipeline overhead: run wall not spent on the critical path of training (per round, the busiest
  lane's summed task compute time, measured where the task trained) or evaluating.

    .venv/bin/python benchmarks/system.py --rounds 10

Writes ``benchmarks/results/system.{json,md,png}``. ``--summary`` puts every figure of issue 19 in one
table (``system_summary.{json,md}``, see ``benchmarks/system_summary.py``).
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import write_json  # noqa: E402
from lorafleet.app.embedded import run_embedded  # noqa: E402
from lorafleet.ml.cores import usable_cores  # noqa: E402
from schemas.config import parse_run_config  # noqa: E402
from schemas.messages import TrainTask  # noqa: E402
from worker.lanes import lane_plan  # noqa: E402
from worker.trainer import Trainer, TrainOutcome  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024

#: the job of issue 19, as Flower ran it
FLOWER_JOB: dict[str, Any] = {
    "run_id": "system-flower-job",
    "seed": 0,
    "strategy": "fedlora",
    "model": {"name": "minilm", "max_seq_len": 64},
    "data": {"dataset": "sst2", "samples_per_device": 500},
    "lora": {"rank": 8, "alpha_ratio": 2.0, "dropout": 0.05, "target_modules": ["query", "value"]},
    "training": {"local_epochs": 1, "max_steps": 15, "batch_size": 16, "lr": 1.0e-3, "weight_decay": 0.0},
    "devices": {"count": 8},
    "rounds": {"max_rounds": 10, "quorum_fraction": 1.0, "round_deadline_s": 1800},
}


class _Timed:
    """Records each task's compute time (measured where it trained) by round and device."""

    def __init__(self, inner: Trainer, index: int, log: dict[int, dict[int, float]]) -> None:
        self.inner = inner
        self.index = index
        self.log = log
        submit = getattr(inner, "submit", None)
        if submit is not None:
            self.submit = submit  # keep the lanes' prefetch

    def train(self, task: TrainTask, start: Any) -> TrainOutcome:
        outcome = self.inner.train(task, start)
        self.log[task.round][self.index] = outcome.metrics.compute_s
        return outcome


class _PssSampler(threading.Thread):
    """The peak of the summed PSS of this process and its children, every ``every_s``."""

    def __init__(self, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every_s = every_s
        self.peak_mib = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(self.every_s):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss
                except psutil.Error:
                    continue
            self.peak_mib = max(self.peak_mib, total / MIB)


def cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(lanes: int, rounds: int, out: Path) -> dict[str, Any]:
    started, cpu_before = time.perf_counter(), cpu_s()
    job = {**FLOWER_JOB, "model": {**FLOWER_JOB["model"], "lanes": lanes}}
    job["rounds"] = {**FLOWER_JOB["rounds"], "max_rounds": rounds}
    config = parse_run_config(job)
    count, threads = lane_plan(lanes, config.model.torch_threads, config.devices.count, usable_cores())
    compute: dict[int, dict[int, float]] = defaultdict(dict)
    sampler = _PssSampler()
    sampler.start()
    report = run_embedded(config, out, quiet=False, wrap_trainer=lambda i, t: _Timed(t, i, compute))
    sampler.stop.set()
    command_s, cpu = time.perf_counter() - started, cpu_s() - cpu_before
    per_round = []
    for r in report["rounds"]:
        lane_busy: dict[int, float] = defaultdict(float)
        for index, seconds in compute[r["round"]].items():
            lane_busy[index % count] += seconds
        critical = max(lane_busy.values(), default=0.0)
        per_round.append(
            {
                "round": r["round"],
                "accuracy": r["accuracy"],
                # open to the orchestrator's close of the round, which (embedded) comes after the
                # aggregator's step that merged and evaluated it: the evaluation is inside
                "round_s": r["round_time_s"],
                "training_critical_s": critical,
                "eval_s": r["eval_s"],
                "task_compute_s": sum(compute[r["round"]].values()),
            }
        )
    run_s = report["rounds"][-1]["wall_time_s"]  # to the last round's close, its evaluation inside
    useful = sum(p["training_critical_s"] + p["eval_s"] for p in per_round)
    return {
        "lanes": count,
        "threads_per_lane": threads,
        "rounds": len(per_round),
        "final_accuracy": report["final_accuracy"],
        "command_wall_s": command_s,
        "run_wall_s": run_s,
        "s_per_round_mean": sum(p["round_s"] for p in per_round) / len(per_round),
        "s_per_round_range": [min(p["round_s"] for p in per_round), max(p["round_s"] for p in per_round)],
        "cpu_s": cpu,
        "peak_pss_mib": sampler.peak_mib,
        "pipeline_overhead_s": run_s - useful,
        "pipeline_overhead_fraction": (run_s - useful) / run_s,
        "per_round": per_round,
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# System speed: the Flower job of issue 19, embedded",
        "",
        f"`{doc['command']}` on {doc['host']} ({doc['date']}).",
        "",
        "| lanes x threads | rounds | final accuracy | command wall s | run wall s | s per round (range) "
        "| CPU s | peak PSS MiB | pipeline overhead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in doc["runs"]:
        low, high = row["s_per_round_range"]
        lines.append(
            f"| {row['lanes']} x {row['threads_per_lane']} | {row['rounds']} | {row['final_accuracy']:.4f} "
            f"| {row['command_wall_s']:.1f} | {row['run_wall_s']:.1f} | {row['s_per_round_mean']:.1f} "
            f"({low:.1f}-{high:.1f}) | {row['cpu_s']:.0f} | {row['peak_pss_mib']:.0f} "
            f"| {row['pipeline_overhead_s']:.1f} s ({100 * row['pipeline_overhead_fraction']:.1f}%) |"
        )
    lines += ["", "Per round (critical path of training = the busiest lane's summed task compute time):", ""]
    for row in doc["runs"]:
        lines += [
            f"{row['lanes']} lane(s):",
            "",
            "| round | accuracy | round s | training critical s | eval s | task compute s (all lanes) |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['round']} | {p['accuracy']:.4f} | {p['round_s']:.1f} | {p['training_critical_s']:.1f} "
            f"| {p['eval_s']:.1f} | {p['task_compute_s']:.1f} |"
            for p in row["per_round"]
        ]
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(doc["runs"]), figsize=(6 * len(doc["runs"]), 4), squeeze=False)
    for ax, row in zip(axes[0], doc["runs"], strict=True):
        rounds = [p["round"] for p in row["per_round"]]
        train = [p["training_critical_s"] for p in row["per_round"]]
        evals = [p["eval_s"] for p in row["per_round"]]
        rest = [p["round_s"] - t - e for p, t, e in zip(row["per_round"], train, evals, strict=True)]
        ax.bar(rounds, train, label="training (critical path)")
        ax.bar(rounds, evals, bottom=train, label="evaluation")
        ax.bar(rounds, rest, bottom=[t + e for t, e in zip(train, evals, strict=True)], label="other")
        title = f"{row['lanes']} lane(s) x {row['threads_per_lane']} thread(s)"
        ax.set(xlabel="round", ylabel="seconds", title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--lanes", type=int, nargs="+", default=[0], help="model.lanes per run (0: auto)")
    parser.add_argument("--out", type=Path, default=Path("runs/system"))
    parser.add_argument(
        "--summary",
        action="store_true",
        help="every figure of issue 19 in one table (benchmarks/system_summary.py)",
    )
    parser.add_argument(
        "--updates", type=int, default=1000, help="--summary: updates in the aggregation timing"
    )
    args = parser.parse_args()
    if args.summary:
        from benchmarks.system_summary import write

        print(write(FLOWER_JOB, args.updates, "python benchmarks/system.py " + " ".join(sys.argv[1:])))
        return
    runs = [measure(lanes, args.rounds, args.out / f"lanes-{lanes}") for lanes in args.lanes]
    doc = {
        "command": "python benchmarks/system.py " + " ".join(sys.argv[1:]),
        "host": f"{usable_cores()} usable cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "date": time.strftime("%Y-%m-%d"),
        "job": FLOWER_JOB,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "system.json", doc)
    (RESULTS / "system.md").write_text(markdown(doc), encoding="utf-8")
    plot(doc, RESULTS / "system.png")
    print(markdown(doc))


if __name__ == "__main__":
    main()
