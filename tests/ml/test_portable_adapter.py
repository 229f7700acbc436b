"""The exported adapter travels: plain peft loads a copy of it where lorafleet is not importable,
``lorafleet predict`` reproduces the run's accuracy, ``lorafleet merge`` writes a plain transformers
model with the adapter's logits, and the folder names its base model by id, not by a local path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from lorafleet.app.cli import app
from lorafleet.app.embedded import run_embedded
from lorafleet.data.datasets import eval_set, load_split
from lorafleet.ml.model import MINILM_ID, model_path, public_model_id
from lorafleet.ml.portable import load_adapter
from lorafleet.ml.tiny import save_tiny_model
from schemas.config import ModelConfig, RunConfig, parse_run_config

#: Loads an adapter copy with plain peft + transformers and scores rows: run with ``python -I -S``
#: and only the interpreter's site-packages on sys.path, so neither the repository nor the editable
#: install of lorafleet can be imported.
PLAIN_PEFT = r"""
import json, sys
sys.path.append(sys.argv[1])
try:
    import lorafleet
    raise SystemExit("lorafleet is importable: " + lorafleet.__file__)
except ImportError:
    pass
import torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer
adapter, rows_file = sys.argv[2], sys.argv[3]
rows = json.loads(open(rows_file).read())
meta = json.loads(open(adapter + "/lorafleet.json").read())
model = AutoPeftModelForSequenceClassification.from_pretrained(adapter, num_labels=meta["num_labels"]).eval()
tok = AutoTokenizer.from_pretrained(adapter)
right = 0
with torch.no_grad():
    for i in range(0, len(rows["texts"]), 64):
        batch = rows["texts"][i:i + 64]
        enc = tok(batch, truncation=True, max_length=rows["max_len"], padding=True, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        right += int((logits.argmax(-1) == torch.tensor(rows["labels"][i:i + 64])).sum())
print(json.dumps({"accuracy": right / len(rows["texts"])}))
"""


def _config(model: dict[str, Any], **data: Any) -> RunConfig:
    return parse_run_config(
        {
            "run_id": "portable",
            "strategy": "legend",
            "model": {"max_seq_len": 32, "torch_threads": 1, **model},
            "data": {"samples_per_device": 128, **data},
            "devices": {"count": 2},
            "lora": {"rank": 4},
            "legend": {"top_ranks": [2, 4]},
            "training": {"lr": 3.0e-2, "batch_size": 16, "local_epochs": 2},
            "rounds": {"max_rounds": 3},
        }
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, RunConfig, dict[str, Any]]:
    """(base model folder, run folder, config, report) of a tiny BERT (a folder, as a downloaded
    checkpoint is) trained on the synthetic sentiment rows and evaluated on all 400 of their dev rows."""
    root = tmp_path_factory.mktemp("portable")
    texts = load_split("synthetic", None, "train").texts
    folder = save_tiny_model("bert", root / "tiny-bert", texts=texts, layers=2)
    config = _config({"name": str(folder)}, dataset="synthetic")
    report = run_embedded(config, root / "run", quiet=True)
    return folder, root / "run", config, report


def _rows_file(config: RunConfig, path: Path) -> Path:
    rows = eval_set(config)
    path.write_text(
        json.dumps({"texts": rows.texts, "labels": rows.labels, "max_len": config.model.max_seq_len})
    )
    return path


def _plain_peft_accuracy(adapter: Path, rows: Path, cwd: Path) -> float:
    site = sysconfig.get_paths()["purelib"]
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PLAIN_PEFT, site, str(adapter), str(rows)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return float(json.loads(done.stdout.strip().splitlines()[-1])["accuracy"])


def _point_at(adapter: Path, base: Path) -> None:
    """Give the base model by its local path, as a user without the Hub does."""
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    path.write_text(json.dumps(cfg))


def test_the_adapter_names_its_base_by_id_and_carries_tokenizer_labels_and_card(
    tiny_run: tuple[Path, Path, RunConfig, dict[str, Any]],
) -> None:
    folder, run, _, report = tiny_run
    adapter = run / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "tiny-bert" and str(folder) not in (adapter / "adapter_config.json").read_text()
    meta = json.loads((adapter / "lorafleet.json").read_text())
    assert meta["labels"] == ["negative", "positive"] and meta["num_labels"] == 2
    assert (adapter / "tokenizer_config.json").is_file()
    card = (adapter / "README.md").read_text()
    assert "base_model: tiny-bert" in card and "library_name: peft" in card
    assert f"| final accuracy (evaluation split) | {report['final_accuracy']} |" in card
    assert "strategy: legend" in card and "samples_per_device: 128" in card


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers flag
def test_plain_peft_loads_a_copy_where_lorafleet_is_not_importable(
    tiny_run: tuple[Path, Path, RunConfig, dict[str, Any]], tmp_path: Path
) -> None:
    folder, run, config, report = tiny_run
    copy = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(run / "adapter", copy)
    _point_at(copy, folder)
    accuracy = _plain_peft_accuracy(copy, _rows_file(config, tmp_path / "rows.json"), tmp_path)
    assert len(eval_set(config)) == 400
    assert accuracy == pytest.approx(report["final_accuracy"], abs=1e-9)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers flag
def test_predict_reproduces_the_reported_accuracy_on_dev(
    tiny_run: tuple[Path, Path, RunConfig, dict[str, Any]], tmp_path: Path
) -> None:
    _, run, config, report = tiny_run
    dev = eval_set(config)
    texts = tmp_path / "dev.txt"
    texts.write_text("\n".join(dev.texts) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["predict", str(run / "adapter"), "--file", str(texts)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == dev.texts
    assert {r["label"] for r in rows} == {"negative", "positive"}  # not one class for every row
    assert report["final_accuracy"] > 0.6
    assert all(abs(sum(r["scores"].values()) - 1.0) < 1e-4 for r in rows)
    accuracy = sum(r["label_id"] == y for r, y in zip(rows, dev.labels, strict=True)) / len(dev)
    assert accuracy == pytest.approx(report["final_accuracy"], abs=1e-9)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers flag
def test_predict_takes_texts_and_says_when_there_are_none(
    tiny_run: tuple[Path, Path, RunConfig, dict[str, Any]],
) -> None:
    _, run, _, _ = tiny_run
    result = CliRunner().invoke(
        app, ["predict", str(run / "adapter"), "--text", "a gorgeous film", "--text", "dull"]
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == ["a gorgeous film", "dull"]
    assert CliRunner().invoke(app, ["predict", str(run / "adapter")]).exit_code != 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers flag
def test_merge_writes_a_model_transformers_loads_with_the_adapter_s_logits(
    tiny_run: tuple[Path, Path, RunConfig, dict[str, Any]], tmp_path: Path
) -> None:
    _, run, _, _ = tiny_run
    result = CliRunner().invoke(app, ["merge", str(run / "adapter"), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    assert not any("lora" in name for name, _ in merged.named_parameters())
    enc = tokenizer(
        ["a gorgeous , witty film", "dull and lifeless", "it is a film"], padding=True, return_tensors="pt"
    )
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        expected = load_adapter(run / "adapter").model(**inputs).logits
        got = merged(**inputs).logits
    assert not torch.allclose(expected, torch.zeros_like(expected))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_the_public_id_is_the_hub_id_or_the_recorded_name_never_a_local_path(tmp_path: Path) -> None:
    assert (
        public_model_id(ModelConfig(name="minilm")) == MINILM_ID == "sentence-transformers/all-MiniLM-L6-v2"
    )
    hub = tmp_path / "from-hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}))
    assert public_model_id(ModelConfig(name=str(hub))) == "Qwen/Qwen2.5-0.5B-Instruct"
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "training" / "path")}))
    assert public_model_id(ModelConfig(name=str(local))) == "my-model"


@pytest.mark.ml
@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers flag
def test_a_minilm_adapter_reloads_elsewhere_and_predicts_its_reported_accuracy(tmp_path: Path) -> None:
    config = _config({"name": "minilm"}, dataset="sst2", eval_samples=128)
    report = run_embedded(
        config.model_copy(update={"rounds": config.rounds.model_copy(update={"max_rounds": 1})}),
        tmp_path / "run",
        quiet=True,
    )
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == MINILM_ID
    copy = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(adapter, copy)
    _point_at(copy, Path(model_path(config.model)))
    rows = _rows_file(config, tmp_path / "rows.json")
    assert _plain_peft_accuracy(copy, rows, tmp_path) == pytest.approx(report["final_accuracy"], abs=1e-9)
    texts = tmp_path / "dev.txt"
    texts.write_text("\n".join(eval_set(config).texts) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["predict", str(adapter), "--file", str(texts)])
    assert result.exit_code == 0, result.output
    labels = eval_set(config).labels
    predicted = [json.loads(line)["label_id"] for line in result.stdout.splitlines()]
    assert sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels) == pytest.approx(
        report["final_accuracy"], abs=1e-9
    )
