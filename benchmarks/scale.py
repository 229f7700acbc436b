"""Scale in one process (issue 19 part 3): many devices embedded, wall time and peak memory.

Two runs, each in its own child process (its peak RSS from ``wait4``, nothing else in it):

* ``--devices`` (default 1,000) devices training the tiny random BERT on SST-2 rows (``--samples``
  each), FedLoRA, ``--rounds`` rounds;
* ``--fake-devices`` (default 10,000) devices with the fake trainer (worker/trainer.py
  ``FakeTrainer``: no model in the loop, a fixed delta per update; ``--fake-samples`` rows each),
  one round.

Per run: wall seconds from the command's start, seconds to every device registered, per-round wall
seconds, peak RSS, and peak RSS per device over the same run's memory at one device (``--baseline``
devices, default 1). Writes ``benchmarks/results/scale.{json,md}``.

    .venv/bin/python benchmarks/scale.py
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def run_config(devices: int, rounds: int, samples: int, run_id: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "seed": 0,
        "strategy": "fedlora",
        "model": {"name": "tiny", "max_seq_len": 32, "tiny_layers": 2, "tiny_hidden": 32},
        "data": {"dataset": "sst2", "samples_per_device": samples, "eval_samples": 256},
        "devices": {"count": devices},
        "lora": {"rank": 4},
        "training": {"batch_size": 16, "lr": 5.0e-3},
        "rounds": {"max_rounds": rounds, "round_deadline_s": 3600.0, "registration_timeout_s": 3600.0},
        "security": {"require_signatures": False},
    }


def child(args: argparse.Namespace) -> None:
    """One embedded run in this process; prints its figures as one JSON line."""
    from lorafleet.app.embedded import run_embedded
    from schemas.config import parse_run_config
    from worker.trainer import FakeTrainer

    started = time.monotonic()
    raw = run_config(args.devices, args.rounds, args.samples, f"scale-{args.devices}")
    config = parse_run_config(raw, source="benchmarks/scale.py")
    wrap = (lambda i, t: FakeTrainer(delta=0.01, num_samples=args.samples)) if args.fake else None
    report = run_embedded(config, args.out, quiet=True, wrap_trainer=wrap)
    rounds = report["rounds"]
    print(
        json.dumps(
            {
                "devices": args.devices,
                "fake_trainer": args.fake,
                "rounds": len(rounds),
                "final_round": report["final_round"],
                "devices_reported": [r.get("devices_reported") for r in rounds],
                "round_wall_s": [r.get("round_time_s") for r in rounds],
                "wall_s": time.monotonic() - started,
                "run_wall_s": report.get("wall_time_s"),
            }
        ),
        flush=True,
    )


def measure(devices: int, rounds: int, samples: int, fake: bool, out: Path) -> dict[str, Any]:
    """Run one child; its JSON line with its peak RSS (``wait4``) added."""
    command = [sys.executable, __file__, "--child", "--devices", str(devices), "--rounds", str(rounds)]
    command += ["--samples", str(samples), "--out", str(out)] + (["--fake"] if fake else [])
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed with {proc.returncode}")
    row: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    row["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    row["cpu_s"] = usage.ru_utime + usage.ru_stime
    row["process_wall_s"] = time.monotonic() - started
    return row


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Scale in one process",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, load average before {rows[0].get('loadavg')})",
        "",
        "| devices | trainer | rounds | devices reporting per round | round wall s | process wall s "
        "| CPU s | peak RSS MiB | RSS per device over the 1-device run (KiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = r.get("rss_per_device_kib")
        lines.append(
            f"| {r['devices']:,} | {'fake' if r['fake_trainer'] else 'tiny BERT'} | {r['rounds']} "
            f"| {r['devices_reported']} | {[round(s or 0, 1) for s in r['round_wall_s']]} "
            f"| {r['process_wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} "
            f"| {'' if per is None else f'{per:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--fake-devices", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16, help="rows per device")
    parser.add_argument("--fake-samples", type=int, default=4, help="rows per fake-trainer device")
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fake", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for devices, rounds, fake in (
        (1, args.rounds, False),
        (args.devices, args.rounds, False),
        (1, 1, True),
        (args.fake_devices, 1, True),
    ):
        load = os.getloadavg()
        out = args.work / f"{devices}-{'fake' if fake else 'tiny'}"
        row = measure(devices, rounds, args.fake_samples if fake else args.samples, fake, out)
        row["loadavg"] = [round(x, 2) for x in load]
        print(json.dumps(row), flush=True)
        rows.append(row)
    for big, one in ((rows[1], rows[0]), (rows[3], rows[2])):
        big["rss_per_device_kib"] = (big["peak_rss_mib"] - one["peak_rss_mib"]) * 1024 / (big["devices"] - 1)
    command = ".venv/bin/python benchmarks/scale.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    doc = {"command": command, "rows": [rows[1], rows[3]], "baselines": [rows[0], rows[2]]}
    (RESULTS / "scale.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "scale.md").write_text(markdown(rows, command), encoding="utf-8")
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
