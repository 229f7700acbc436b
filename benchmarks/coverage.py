"""``aggregation_coverage`` against the regime where HierFedLoRA-style diverged without clipping.

The regime of ``benchmarks/results/hierfedlora-sgd-unclipped`` (20 Newsgroups, Dirichlet alpha 0.1, 21
devices in three speed tiers, 3 groups, SGD lr 0.5, three local epochs, no gradient clipping): there
the deeper blocks were trained by one skewed group alone, the contributor-only merge set them to that
group's values at every global round, and the run collapsed at global round 10. Each ``--coverages``
value is one ``hierfedlora`` run (its own process, one torch thread) of ``--rounds`` global rounds:
0 is the contributor-only merge, 1 moves a block trained by groups holding a share s of the samples
s of the way (aggregator/merge/rankwise.py).

    .venv/bin/python benchmarks/coverage.py --rounds 14 --coverages 0 1

Writes ``benchmarks/results/coverage.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import run_strategy, write_json  # noqa: E402
from benchmarks.hierfedlora import base_config  # noqa: E402
from schemas.config import merge_overrides  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: the flags of benchmarks/results/hierfedlora-sgd-unclipped, as benchmarks/hierfedlora.py reads them
UNCLIPPED = argparse.Namespace(
    seed=0,
    quick=False,
    threads=1,
    max_seq_len=64,
    samples_per_device=40,
    eval_samples=400,
    groups=3,
    max_frequency=3,
    lr=0.5,
    optimizer="sgd",
    local_epochs=3,
    max_grad_norm=None,
    devices=21,
)


def one_run(coverage: float, rounds: int, runs: Path, resume: bool) -> dict[str, Any]:
    base = merge_overrides(
        base_config(UNCLIPPED, "20newsgroups", 0.1),
        {"aggregation_coverage": coverage, "run_id": f"coverage-{coverage:g}".replace(".", "-")},
    )
    # --resume: a finished run of the same configuration under --runs is reused (benchmarks/harness.py);
    # it says nothing of the code that made it, so not by default
    report = run_strategy(
        base, "hierfedlora", runs / f"coverage-{coverage:g}", resume=resume, max_rounds=rounds
    )
    return {
        "coverage": coverage,
        "wall_s": report["bench_wall_s"],
        "rounds": [
            {k: r.get(k) for k in ("round", "accuracy", "loss", "virtual_time_s", "depths")}
            for r in report["rounds"]
        ],
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# aggregation_coverage in the unclipped HierFedLoRA-style regime",
        "",
        f"Command: `{result['command']}`",
        "",
        "20 Newsgroups alpha 0.1, 21 devices, 3 groups, SGD lr 0.5, 3 local epochs, no clipping "
        "(the regime of `hierfedlora-sgd-unclipped/`). Dev accuracy (loss) per global round:",
        "",
        "| global round | " + " | ".join(f"coverage {r['coverage']:g}" for r in result["runs"]) + " |",
        "|---|" + "---|" * len(result["runs"]),
    ]
    count = max(len(r["rounds"]) for r in result["runs"])
    for i in range(count):
        cells = []
        for r in result["runs"]:
            row = r["rounds"][i] if i < len(r["rounds"]) else None
            cells.append("" if row is None else f"{row['accuracy']:.4f} ({row['loss']:.2f})")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in result["runs"]:
        accs = [row["accuracy"] for row in r["rounds"]]
        lines.append(
            f"* coverage {r['coverage']:g}: best {max(accs):.4f}, last {accs[-1]:.4f}, "
            f"highest loss {max(row['loss'] for row in r['rounds']):.2f}, {r['wall_s']:.0f} s of wall"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result["runs"]:
        ax.plot(
            [row["round"] for row in r["rounds"]],
            [row["accuracy"] for row in r["rounds"]],
            marker="o",
            label=f"aggregation_coverage {r['coverage']:g}",
        )
    ax.set_xlabel("global round")
    ax.set_ylabel("dev accuracy")
    ax.set_title("HierFedLoRA-style, 20NG alpha 0.1, SGD lr 0.5, no clipping")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=14, help="global rounds per run")
    parser.add_argument("--coverages", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--runs", type=Path, default=Path("runs/coverage"))
    parser.add_argument("--resume", action="store_true", help="reuse finished runs of the same configuration")
    args = parser.parse_args()
    with ProcessPoolExecutor(max_workers=len(args.coverages)) as pool:
        runs = list(
            pool.map(partial(one_run, rounds=args.rounds, runs=args.runs, resume=args.resume), args.coverages)
        )
    result = {
        "command": ".venv/bin/python benchmarks/coverage.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_after": os.getloadavg(),
        "runs": runs,
    }
    write_json(RESULTS / "coverage.json", result)
    (RESULTS / "coverage.md").write_text(markdown(result), encoding="utf-8")
    plot(result, RESULTS / "coverage.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
