"""Poisoned devices against plain and robust aggregation (not a test).

20% of the devices (2 of 10) send poisoned updates in every round: their trained change scaled by
100 (``scale``), random tensors (``random``), or NaN (``nan``, refused at validation). For each
mode the same run goes with plain averaging and with the robust options (coordinate-wise median,
20% trimmed mean, norm clipping), beside the clean run. Tiny random BERT on the synthetic task,
so it runs in minutes; rounds close at an 80% quorum (NaN updates are dead-lettered, never counted).

    python benchmarks/poisoning.py
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import write_json  # noqa: E402
from lorafleet.app.embedded import run_embedded  # noqa: E402
from schemas.config import merge_overrides, parse_run_config  # noqa: E402
from schemas.messages import TrainTask  # noqa: E402
from worker.trainer import Trainer, TrainOutcome  # noqa: E402

POISONED = (0, 1)
BASE: dict[str, Any] = {
    "run_id": "bench-poison",
    "seed": 0,
    "model": {"name": "tiny", "tiny_layers": 2, "tiny_hidden": 64, "max_seq_len": 32},
    "data": {"dataset": "synthetic", "samples_per_device": 128, "eval_samples": 400},
    "devices": {"count": 10},
    "lora": {"rank": 4},
    "training": {"lr": 5.0e-3, "local_epochs": 2},
    "rounds": {"max_rounds": 6, "quorum_fraction": 0.8},
}
ROBUST = {
    "mean": {},
    "median": {"robust": {"method": "median"}},
    "trimmed_mean": {"robust": {"method": "trimmed_mean", "trim": 0.2}},
    "clip_mean": {"robust": {"clip_norm": 5.0}},
}


class PoisonedTrainer:
    """Trains honestly, then corrupts what it sends."""

    def __init__(self, inner: Trainer, mode: str, seed: int) -> None:
        self.inner, self.mode, self.generator = inner, mode, torch.Generator().manual_seed(seed)

    def train(self, task: TrainTask, start: dict[str, torch.Tensor]) -> TrainOutcome:
        outcome = self.inner.train(task, start)
        if self.mode == "scale":
            bad = {k: start[k] + 100.0 * (v - start[k]) for k, v in outcome.tensors.items()}
        elif self.mode == "random":
            bad = {k: torch.randn(v.shape, generator=self.generator) for k, v in outcome.tensors.items()}
        else:
            bad = {k: torch.full_like(v, float("nan")) for k, v in outcome.tensors.items()}
        return TrainOutcome(bad, outcome.metrics, outcome.num_samples)


def run(name: str, extra: dict[str, Any], mode: str | None, out: Path) -> dict[str, Any]:
    config = parse_run_config(merge_overrides(BASE, {**extra, "run_id": f"poison-{name}"}))

    def wrap(index: int, trainer: Trainer) -> Trainer:
        return PoisonedTrainer(trainer, mode, index) if mode is not None and index in POISONED else trainer

    started = time.perf_counter()
    report = run_embedded(config, out / name, quiet=True, wrap_trainer=wrap)
    return {
        "final_accuracy": report["final_accuracy"],
        "accuracy_by_round": [r["accuracy"] for r in report["rounds"]],
        "rejected": report["rejected"],
        "updates": report["updates"],
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    out = Path("runs/bench-poison")
    started = time.perf_counter()
    results: dict[str, Any] = {"clean": run("clean", {}, None, out)}
    print(f"clean: {results['clean']['final_accuracy']:.4f}")
    for mode in ("scale", "random", "nan"):
        for name, extra in ROBUST.items():
            key = f"{mode}/{name}"
            results[key] = run(f"{mode}-{name}", extra, mode, out)
            delta = results[key]["final_accuracy"] - results["clean"]["final_accuracy"]
            print(f"{key}: {results[key]['final_accuracy']:.4f} ({delta:+.4f} vs clean)")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_json(
        Path("benchmarks/results/poisoning.json"),
        {
            "command": command,
            "setup": BASE,
            "poisoned_devices": list(POISONED),
            "robust_options": ROBUST,
            "wall_s": time.perf_counter() - started,
            "runs": results,
        },
    )


if __name__ == "__main__":
    main()
