"""Real devices with their own instruction rows, evaluated federated, over RabbitMQ and Redis.

Every service runs as its own ``lorafleet`` process, as the README's "Deploying on real devices" has
them: each worker reads only its own JSON-lines file of prompt/response rows (``--data``), holds a
quarter of them out (``eval.device_fraction``), trains a tiny random Llama on the rest and evaluates
every round's global adapter on the held-out ones; updates and results are signed. The report carries
the central figures (the aggregator's file) and the federated ones, which equal the final adapter
evaluated here over the union of the devices' held-out rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from aggregator.evaluation import evaluate
from lorafleet.app.wiring import build_runtime
from lorafleet.data.datasets import TextDataset, encode_dataset, synthetic_rows
from lorafleet.data.held_out import held_out_seed, split_held_out
from lorafleet.data.instructions import as_instructions, read_jsonl
from lorafleet.state.redis import RedisStateStore
from schemas.config import load_run_config
from schemas.messages import LoraSpec

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEVICES = ("dev-0000", "dev-0001", "dev-0002")
ROWS_PER_DEVICE = 96


def _write_instructions(path: Path, n: int, seed: int) -> Path:
    """``n`` synthetic reviews asked as questions, under the field names the configuration gives."""
    texts, labels = synthetic_rows(n, seed=seed)
    rows = as_instructions(TextDataset(texts, labels, 2, "synthetic"))
    assert rows.responses is not None
    lines = [
        json.dumps({"instruction": p, "output": r}) for p, r in zip(rows.texts, rows.responses, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CONFIG = """\
run_id: {run_id}
seed: 0
strategy: fedlora
model: {{name: tiny, tiny_family: llama, tiny_layers: 4, tiny_hidden: 64, task: causal_lm, max_seq_len: 48}}
data:
  dataset: jsonl
  source: local
  eval_path: {eval_path}
  prompt_field: instruction
  response_field: output
devices: {{count: 3}}
lora: {{rank: 8}}
training: {{batch_size: 16, lr: 2.0e-2, local_epochs: 2}}
rounds: {{max_rounds: 3, lease_s: 60}}
eval: {{device_fraction: 0.25, wait_s: 60}}
"""


@pytest.mark.timeout(600)
def test_devices_train_on_their_own_instruction_rows_and_evaluate_on_held_out_ones(
    rabbitmq_url: str, redis_url: str, run_id: str, tmp_path: Path
) -> None:
    # Given three devices, each with its own file of instruction rows, and the aggregator's eval file
    files = {
        d: _write_instructions(tmp_path / f"{d}.jsonl", ROWS_PER_DEVICE, seed=10 + i)
        for i, d in enumerate(DEVICES)
    }
    eval_path = _write_instructions(tmp_path / "eval.jsonl", 48, seed=99)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(CONFIG.format(run_id=run_id, eval_path=eval_path), encoding="utf-8")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORAFLEET_BROKER_URL": rabbitmq_url,
        "LORAFLEET_STATE_URL": redis_url,
        "LORAFLEET_FLEET_KEY": "ab" * 32,  # signatures are required distributed: workers derive their keys
    }
    base = [sys.executable, "-m", "lorafleet"]
    commands = {
        "orchestrator": [*base, "orchestrator", str(config_path), "--out", str(out), "--threads", "1"],
        "aggregator": [*base, "aggregator", str(config_path), "--out", str(out), "--threads", "1"],
    }
    for d in DEVICES:  # workers: the broker only, and their own rows
        commands[d] = [
            *base,
            "worker",
            str(config_path),
            "--device-id",
            d,
            "--data",
            str(files[d]),
            "--threads",
            "1",
        ]
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    started = time.monotonic()
    try:
        for name, command in commands.items():
            with (logs / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
                )
        # When the run goes to its end (the aggregator writes the report last, after the devices' results)
        assert procs["aggregator"].wait(timeout=540) == 0, (logs / "aggregator.log").read_text()[-4000:]
        for name in ("orchestrator", *DEVICES):
            assert procs[name].wait(timeout=60) == 0, (logs / f"{name}.log").read_text()[-4000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        store = RedisStateStore(redis_url)
        store.delete_run(run_id)
        store.close()
    wall = time.monotonic() - started
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    # Then each device trained on 72 of its rows and held 24 out; nothing was refused
    assert {d: (e["num_samples"], e["eval_samples"]) for d, e in report["devices"].items()} == {
        d: (72, 24) for d in DEVICES
    }
    assert report["rejected"] == {} and report["finish_reason"] == "max_rounds"
    # every device evaluated the final round's adapter; the figures are labelled apart from the central ones
    final = report["rounds"][-1]
    assert final["federated_devices"] == {d: 24 for d in DEVICES}
    assert report["final_federated_accuracy"] == final["federated_accuracy"]
    central = [(r["accuracy"], r["loss"]) for r in report["rounds"]]
    federated = [(r["federated_accuracy"], r["federated_loss"]) for r in report["rounds"]]
    print(f"{wall:.0f} s; central (exact match, loss) per round {central}; federated {federated}")
    losses = [loss for _, loss in federated if loss is not None]
    assert losses[-1] < losses[0]  # the devices see the adapter learn on rows it never trained on
    # and the federated figures are the final adapter's over the union of the held-out rows
    config = load_run_config(config_path)
    held = [
        split_held_out(read_jsonl(files[d], "instruction", "output"), 0.25, held_out_seed(0, d))[1]
        for d in DEVICES
    ]
    union = TextDataset(
        [t for h in held for t in h.texts],
        [y for h in held for y in h.labels],
        1,
        "jsonl",
        [r for h in held for r in (h.responses or [])],
    )
    runtime = build_runtime(config)
    checkpoint = out / "checkpoints" / f"round-{report['final_round']:04d}"
    spec_json = json.loads((checkpoint / "lorafleet.json").read_text(encoding="utf-8"))["spec"]
    spec = LoraSpec.model_validate_json(json.dumps(spec_json))
    encoded = encode_dataset(runtime.tokenizer, union, config.model.max_seq_len)
    here = evaluate(runtime, spec, load_file(str(checkpoint / "adapter_model.safetensors")), encoded)
    assert final["federated_loss"] == pytest.approx(here.loss, rel=1e-3)
    assert abs(final["federated_accuracy"] - here.accuracy) <= 1 / len(union)  # exact match, one row's noise
