"""Real devices on SST-2 (issue 16's done-when): each worker reads only its own file.

Writes ``--devices`` JSON-lines files of IID SST-2 training rows (a seeded draw of
``--rows-per-device`` each) and the dev split as the aggregator's evaluation file, then runs every
service as its own ``lorafleet`` process over RabbitMQ and Redis, as README "Deploying on real
devices" has them: each worker gets ``--data`` its file, with the shared data directory hidden from
its environment (no ``LORAFLEET_DATA_DIR``, started in a folder without ``../shared/data``). Each
device holds ``--device-fraction`` of its rows out and evaluates every round's global adapter on them
(federated evaluation). Checks: the central dev accuracy reaches ``--target``; the report's final
federated accuracy equals the final adapter evaluated here over the union of the devices' held-out
rows (one row's tolerance).

    python -m benchmarks.device_local_sst2 --broker amqp://guest:guest@127.0.0.1:5672/%2F \\
        --state redis://127.0.0.1:6379/0 --out benchmarks/results/device_local_sst2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LABELS = ("negative", "positive")


def _tsv_rows(path: Path) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["sentence"].strip(), int(row["label"])) for row in reader]


def _write_jsonl(path: Path, rows: list[tuple[str, int]]) -> Path:
    lines = [json.dumps({"text": text, "label": LABELS[label]}) for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CONFIG = """\
run_id: {run_id}
seed: 0
strategy: {strategy}
model: {{name: minilm, max_seq_len: 64}}
data: {{dataset: sst2, source: local, labels: [negative, positive], eval_path: {eval_path}}}
lora: {{rank: 8, alpha_ratio: 2.0, dropout: 0.1, target_modules: [query, value], layers: all}}
training: {{local_epochs: 1, batch_size: 16, lr: 3.0e-3}}
devices: {{count: {devices}}}
rounds: {{max_rounds: {rounds}, quorum_fraction: 1.0, round_deadline_s: 3600, lease_s: 120}}
eval: {{device_fraction: {fraction}, wait_s: 300}}
"""


def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(os.environ.get("LORAFLEET_DATA_DIR", REPO.parent / "shared" / "data")) / "sst2"
    train = _tsv_rows(data_dir / "train.tsv")
    random.Random(args.seed).shuffle(train)
    work = Path(tempfile.mkdtemp(prefix="lf-device-local-"))
    devices = [f"dev-{i:04d}" for i in range(args.devices)]
    n = args.rows_per_device
    files = {d: _write_jsonl(work / f"{d}.jsonl", train[i * n : (i + 1) * n]) for i, d in enumerate(devices)}
    eval_path = _write_jsonl(work / "dev.jsonl", _tsv_rows(data_dir / "dev.tsv"))
    run_id = f"device-local-{int(time.time())}"
    config_path = work / "run.yaml"
    config_path.write_text(
        CONFIG.format(
            run_id=run_id,
            strategy=args.strategy,
            eval_path=eval_path,
            devices=args.devices,
            rounds=args.rounds,
            fraction=args.device_fraction,
        ),
        encoding="utf-8",
    )
    out = work / "out"  # the run's report, checkpoints and adapter (not committed)
    env = {k: v for k, v in os.environ.items() if k != "LORAFLEET_DATA_DIR"}  # devices see no shared data
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
        LORAFLEET_BROKER_URL=args.broker,
        LORAFLEET_STATE_URL=args.state,
        LORAFLEET_FLEET_KEY="cd" * 32,
    )
    base = [sys.executable, "-m", "lorafleet"]
    threads = ["--threads", "1"]
    commands = {
        "orchestrator": [*base, "orchestrator", str(config_path), "--out", str(out), *threads],
        "aggregator": [*base, "aggregator", str(config_path), "--out", str(out), *threads],
    }
    for d in devices:
        commands[d] = [*base, "worker", str(config_path), "--device-id", d, "--data", str(files[d]), *threads]
    logs = work / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    started = time.monotonic()
    try:
        for name, command in commands.items():
            with (logs / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen(
                    command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT
                )
        code = procs["aggregator"].wait(timeout=args.timeout_s)
        if code != 0:
            raise SystemExit((logs / "aggregator.log").read_text(errors="replace")[-4000:])
        for name in ("orchestrator", *devices):
            procs[name].wait(timeout=120)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - started
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    paths = {d: str(p) for d, p in files.items()}
    return {"report": report, "wall_s": wall, "files": paths, "work": str(work)}


def independent_federated(result: dict[str, Any], fraction: float) -> float:
    """The final adapter's accuracy over the union of the devices' held-out rows, computed here."""
    from safetensors.torch import load_file

    from aggregator.evaluation import evaluate
    from lorafleet.app.wiring import build_runtime
    from lorafleet.data.datasets import TextDataset, encode_dataset
    from lorafleet.data.device_rows import read_configured
    from lorafleet.data.held_out import held_out_seed, split_held_out
    from schemas.config import load_run_config
    from schemas.messages import LoraSpec

    report = result["report"]
    config = load_run_config(Path(result["work"]) / "run.yaml")
    held = [
        split_held_out(read_configured(path, config.data), fraction, held_out_seed(config.seed, d))[1]
        for d, path in sorted(result["files"].items())
    ]
    union = TextDataset([t for h in held for t in h.texts], [y for h in held for y in h.labels], 2, "sst2")
    runtime = build_runtime(config)
    checkpoint = Path(result["out"]) / "checkpoints" / f"round-{report['final_round']:04d}"
    spec_json = json.loads((checkpoint / "lorafleet.json").read_text(encoding="utf-8"))["spec"]
    spec = LoraSpec.model_validate_json(json.dumps(spec_json))
    encoded = encode_dataset(runtime.tokenizer, union, config.model.max_seq_len)
    tensors = load_file(str(checkpoint / "adapter_model.safetensors"))
    return float(evaluate(runtime, spec, tensors, encoded).accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--out", default="benchmarks/results/device_local_sst2")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rows-per-device", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategy", default="fedlora")
    parser.add_argument("--device-fraction", type=float, default=0.1)
    parser.add_argument("--target", type=float, default=0.80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    args = parser.parse_args()
    result = run(args)
    result["out"] = str(Path(result["work"]) / "out")
    report = result["report"]
    mine = independent_federated(result, args.device_fraction)
    rounds = [
        {k: r.get(k) for k in ("round", "accuracy", "federated_accuracy", "federated_loss", "wall_time_s")}
        for r in report["rounds"]
    ]
    summary = {
        "command": " ".join(["python -m benchmarks.device_local_sst2", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_after": os.getloadavg(),
        "wall_s": round(result["wall_s"], 1),
        "devices": {
            d: {k: e.get(k) for k in ("num_samples", "eval_samples")} for d, e in report["devices"].items()
        },
        "rounds": rounds,
        "final_accuracy": report["final_accuracy"],
        "final_federated_accuracy": report.get("final_federated_accuracy"),
        "independent_federated_accuracy": mine,
        "target": args.target,
        "reached_target": report["final_accuracy"] is not None and report["final_accuracy"] >= args.target,
    }
    target_dir = Path(args.out)
    target_dir.mkdir(parents=True, exist_ok=True)
    (target_dir / "result.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
