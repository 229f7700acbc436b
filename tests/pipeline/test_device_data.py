"""Real devices' data and what they share: a worker wired by lorafleet.app.wiring trains on its own
file (data.source: local) and registers only its row count and label histogram; bad device data ends
``lorafleet worker`` before it touches the broker; a HierFedLoRA-style run whose devices share no
histogram (privacy.label_histogram: off) or a noisy one completes and its report says which."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorafleet.app.wiring import Shards, build_runtime, build_worker
from lorafleet.ml.model import AdapterRuntime
from lorafleet.run.report import build_report
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from schemas.config import RunConfig, parse_run_config
from schemas.errors import ConfigError
from tests.pipeline.helpers import build_pipeline
from worker.trainer import FakeTrainer

REPO = Path(__file__).resolve().parents[2]
LABELS = ["negative", "positive"]
ROWS: list[dict[str, Any]] = [
    {"sentence": "a fine film", "label": "positive"},
    {"sentence": "dull", "label": 0},
    {"sentence": "great fun", "label": 1},
    {"sentence": "lovely", "label": "positive"},
]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(run_id: str, **top: Any) -> RunConfig:
    return parse_run_config(
        {
            "run_id": run_id,
            "model": {"name": "tiny"},
            "data": {"dataset": "synthetic", "source": "local", "labels": LABELS, "text_field": "sentence"},
            "devices": {"count": 2},
            "lora": {"rank": 4},
            "rounds": {"max_rounds": 1},
            **top,
        }
    )


@pytest.fixture(scope="module")
def runtime() -> AdapterRuntime:
    return build_runtime(_config("runtime"))


def test_worker_registers_its_own_rows_only(tmp_path: Path, runtime: AdapterRuntime) -> None:
    from orchestrator.hierarchical_service import orchestrator_class
    from tests.pipeline.helpers import initial_adapter

    config = _config("local-rows")
    broker = InMemoryBroker()
    state = InMemoryStateStore()
    orchestrator = orchestrator_class(config)(
        InMemoryTransport(broker), state, config=config, num_blocks=2, initial_adapter=initial_adapter
    )
    orchestrator.start()
    shards = Shards.load(config, _jsonl(tmp_path / "mine.jsonl", ROWS))
    assert shards.shard(0).texts == shards.shard(1).texts == [r["sentence"] for r in ROWS]
    worker = build_worker(
        config, 1, InMemoryTransport(broker), runtime, shards, trainer=FakeTrainer(0.1, num_samples=4)
    )
    worker.start()
    for _ in range(20):
        orchestrator.step()
        if "dev-0001" in state.get_devices(config.run_id):
            break
    info = state.get_devices(config.run_id)["dev-0001"]
    assert info["num_samples"] == 4
    assert info["label_histogram"] == [1, 3]
    assert "sentence" not in json.dumps(info) and "lovely" not in json.dumps(info)  # no rows leave it


def test_noisy_histogram_at_registration(tmp_path: Path, runtime: AdapterRuntime) -> None:
    config = _config("noisy-rows", privacy={"label_histogram": "noisy", "epsilon": 0.01})
    shards = Shards.load(config, _jsonl(tmp_path / "mine.jsonl", ROWS * 50))  # 50 negative, 150 positive
    made = [
        build_worker(
            config, i, InMemoryTransport(InMemoryBroker()), runtime, shards, trainer=FakeTrainer(0, 1)
        )
        for i in (0, 0, 1)
    ]
    assert made[0].num_samples == 200
    assert made[0].label_histogram == made[1].label_histogram  # seeded per device and run
    assert made[0].label_histogram != made[2].label_histogram
    assert made[0].label_histogram != [50, 150] and min(made[0].label_histogram) >= 0


def test_source_and_data_must_agree(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.source is local: each worker reads its own rows"):
        Shards.load(_config("no-data"))
    partition = parse_run_config({"model": {"name": "tiny"}, "data": {"dataset": "synthetic"}})
    with pytest.raises(ConfigError, match="is a device's own file, for data.source local"):
        Shards.load(partition, tmp_path / "mine.jsonl")


def _worker_cli_refuses(tmp_path: Path, config_text: str, data: Path) -> str:
    """Run ``lorafleet worker --data`` (through LORAFLEET_DEVICE_DATA) against a "broker" that would see
    any connection; the one line it fails with, having connected to nothing, with status 2."""
    config = tmp_path / "run.yaml"
    config.write_text(config_text, encoding="utf-8")
    with socket.socket() as listener:  # a "broker" that would see any connection attempt
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        env = {**os.environ, "LORAFLEET_DEVICE_DATA": str(data)}
        proc = subprocess.run(
            [sys.executable, "-m", "lorafleet", "worker", str(config), "--device-id", "dev-0000"]
            + ["--broker", f"amqp://guest:guest@127.0.0.1:{port}/"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        (None, "no such file or folder"),
        ([{"sentence": "meh", "label": "neutral"}], "row 1: label 'neutral' is not in data.labels"),
        ([{"text": "meh", "label": 1}], "no column 'sentence'"),
        ([], "the file is empty"),
    ],
)
def test_cli_refuses_bad_device_data_before_the_broker(
    tmp_path: Path, rows: list[dict[str, Any]] | None, problem: str
) -> None:
    data = tmp_path / "device.jsonl"
    if rows is not None:
        _jsonl(data, rows)
    line = _worker_cli_refuses(
        tmp_path,
        "run_id: cli-data\nmodel: {name: tiny}\ndevices: {count: 2}\n"
        "data: {dataset: synthetic, source: local, labels: [negative, positive], text_field: sentence}\n",
        data,
    )
    assert line.startswith(f"error: {data}") and problem in line, line


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        (None, "no such file"),
        (
            [{"instruction": "2+2?", "output": "4"}, {"instruction": "3+3?"}],
            ":2: field 'output' must be a string",
        ),
        ([], "no rows"),
    ],
)
def test_cli_refuses_bad_instruction_rows_before_the_broker(
    tmp_path: Path, rows: list[dict[str, Any]] | None, problem: str
) -> None:
    data = tmp_path / "device.jsonl"
    if rows is not None:
        _jsonl(data, rows)
    line = _worker_cli_refuses(
        tmp_path,
        "run_id: cli-instructions\nmodel: {name: tiny, tiny_family: llama, task: causal_lm}\n"
        "devices: {count: 2}\ndata: {dataset: jsonl, source: local, eval_path: eval.jsonl, "
        "prompt_field: instruction, response_field: output}\n",
        data,
    )
    assert line.startswith(f"error: {data}") and problem in line, line


def test_a_device_reads_only_its_own_instruction_rows(tmp_path: Path) -> None:
    rows = [{"instruction": f"What is {i} + {i}?", "output": str(2 * i)} for i in range(8)]
    config = parse_run_config(
        {
            "model": {"name": "tiny", "tiny_family": "llama", "task": "causal_lm"},
            "data": {
                "dataset": "jsonl",
                "source": "local",
                "eval_path": "eval.jsonl",
                "prompt_field": "instruction",
                "response_field": "output",
            },
            "devices": {"count": 2},
            "eval": {"device_fraction": 0.25},
        }
    )
    shards = Shards.load(config, _jsonl(tmp_path / "mine.jsonl", rows))
    mine = shards.shard(1)
    assert mine.texts == [r["instruction"] for r in rows] and mine.responses == [r["output"] for r in rows]
    assert mine.labels == [0] * 8 and mine.num_labels == 1


@pytest.mark.parametrize("shared", ["off", "noisy"])
def test_hierfedlora_completes_with_what_the_devices_share(
    shared: str, runtime: AdapterRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_run_config(
        {
            "run_id": f"hier-privacy-{shared}",
            "strategy": "hierfedlora",
            "model": {"name": "tiny"},
            "data": {"dataset": "synthetic", "samples_per_device": 20},
            "devices": {"count": 4},
            "lora": {"rank": 4},
            "rounds": {"max_rounds": 2},
            "hier": {"groups": 2, "max_frequency": 2},
            "privacy": {"label_histogram": shared, "epsilon": 0.5},
        }
    )
    broker = InMemoryBroker()
    state = InMemoryStateStore()
    pipeline = build_pipeline(
        config, [InMemoryTransport(broker) for _ in range(2)], state, deltas=[], samples=[], workers=0
    )
    shards = Shards.load(config)
    for i in range(4):
        worker = build_worker(
            config, i, InMemoryTransport(broker), runtime, shards, trainer=FakeTrainer(0.1 * (i + 1), 20)
        )
        assert (worker.label_histogram == []) == (shared == "off")  # noisy: counts with noise
        worker.start()
        pipeline.workers.append(worker)
    with caplog.at_level(logging.WARNING, logger="orchestrator.planners.global_round"):
        pipeline.drive()
    assert pipeline.orchestrator.finished and pipeline.aggregator.finished
    report = build_report(config, state)
    assert report["final_round"] == 2 and report["finish_reason"] == "max_rounds"
    assert set(report["devices"]) == set(config.device_ids())
    for entry in report["devices"].values():  # the report says what each device shared
        assert entry["privacy"] == {"label_histogram": shared, "epsilon": 0.5 if shared == "noisy" else None}
        assert (entry["label_histogram"] == []) == (shared == "off") and entry["num_samples"] == 20
    warned = [r.getMessage() for r in caplog.records if "privacy.label_histogram is off" in r.getMessage()]
    assert len(warned) == (1 if shared == "off" else 0)
