"""Fixtures for the ML tests: a tiny random BERT, the synthetic dataset (fast, no files), and tiny random
models of every tested family saved to folders with their own tokenizers, as downloaded checkpoints are."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch.nn.functional import cross_entropy
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lorafleet.data.datasets import (
    EncodedDataset,
    encode_dataset,
    eval_set,
    iter_batches,
    load_split,
    synthetic_rows,
)
from lorafleet.data.instructions import as_instructions
from lorafleet.ml.architecture import Task
from lorafleet.ml.model import AdapterRuntime, load_tokenizer
from lorafleet.ml.tiny import SIMPLE_CHAT_TEMPLATE, save_tiny_model
from schemas.config import ModelConfig, parse_run_config
from schemas.messages import LoraSpec, TrainHyperParams, TrainTask
from schemas.tensors import encode_tensors

Synthetic = tuple[EncodedDataset, EncodedDataset]

TINY = ModelConfig(name="tiny", tiny_layers=3, tiny_hidden=32, max_seq_len=32)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def runtime() -> AdapterRuntime:
    return AdapterRuntime(TINY, num_labels=2, seed=0)


#: Builds (once per session) a tiny random model of a family saved to a folder: (family, task) -> path.
ModelFolder = Callable[..., Path]

#: The texts the folders' tokenizers learn: the synthetic sentiment rows, plain and as questions.
_TOKENIZER_TEXTS = synthetic_rows(400, seed=0)[0]


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> ModelFolder:
    """``model_folder(family, task="sequence_classification", layers=3, chat=False, extra_texts=(),
    hidden=32)``: the folder of a tiny random ``family`` model (a causal LM with init std 0.2 so its
    frozen output layer spans wide logits) and its tokenizer, trained on the synthetic vocabulary and
    the test's extra words; built once per session."""
    root = tmp_path_factory.mktemp("models")
    built: dict[tuple[str, str, int, bool, tuple[str, ...], int], Path] = {}

    def build(
        family: str,
        task: Task = "sequence_classification",
        layers: int = 3,
        chat: bool = False,
        extra_texts: tuple[str, ...] = (),
        hidden: int = 32,
    ) -> Path:
        key = (family, task, layers, chat, extra_texts, hidden)
        if key not in built:
            texts = list(_TOKENIZER_TEXTS) + as_instructions(load_split("synthetic", None, "eval")).texts[:50]
            built[key] = save_tiny_model(
                family,
                root / f"{family}-{task}-{layers}-{int(chat)}-{len(built)}",
                texts=texts + list(extra_texts),
                task=task,
                layers=layers,
                hidden=hidden,
                chat_template=SIMPLE_CHAT_TEMPLATE if chat else None,
                init_std=0.2 if task == "causal_lm" else 0.02,
            )
        return built[key]

    return build


@pytest.fixture(scope="session")
def synthetic() -> Synthetic:
    """(train, eval) synthetic data encoded with the MiniLM tokenizer."""
    tok = load_tokenizer(TINY)
    return (
        encode_dataset(tok, load_split("synthetic", None, "train"), TINY.max_seq_len),
        encode_dataset(tok, load_split("synthetic", None, "eval"), TINY.max_seq_len),
    )


def make_spec(layer_ranks: dict[int, int], targets: tuple[str, ...] = ("query", "value")) -> LoraSpec:
    return LoraSpec(target_modules=list(targets), layer_ranks=layer_ranks)


def make_task(spec: LoraSpec, start: dict[str, torch.Tensor], **hparams: object) -> TrainTask:
    return TrainTask(
        task_id="task-1",
        run_id="run",
        round=hparams.pop("round", 0),  # type: ignore[arg-type]
        device_id="dev-0000",
        plan_version=0,
        lora=spec,
        hparams=TrainHyperParams(**hparams),  # type: ignore[arg-type]
        adapter=encode_tensors(start),
        issued_at=0.0,
        deadline_at=1.0,
    )


@torch.no_grad()
def plain_peft_metrics(run_dir: Path, folder: Path) -> tuple[float, float]:
    """(accuracy, loss) of the run's adapter through AutoModel*.from_pretrained + PeftModel.from_pretrained,
    scored here independently of lorafleet's evaluator."""
    meta = json.loads((run_dir / "adapter" / "lorafleet.json").read_text())
    config = parse_run_config(json.loads((run_dir / "report.json").read_text())["config"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = encode_dataset(tokenizer, eval_set(config), config.model.max_seq_len)
    if meta["task"] == "causal_lm":
        base = AutoModelForCausalLM.from_pretrained(folder)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=meta["num_labels"], pad_token_id=meta["pad_token_id"]
        )
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    right, loss_sum, count = 0, 0.0, 0
    for batch in iter_batches(encoded, 16, seed=None):
        labels = batch.pop("labels")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if meta["task"] == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
            scored = labels != -100
            loss_sum += float(cross_entropy(logits[scored], labels[scored], reduction="sum"))
            count += int(scored.sum())
            right += int(((logits.argmax(-1) == labels) | ~scored).all(dim=1).sum())
        else:
            loss_sum += float(cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
            right += int((logits.argmax(-1) == labels).sum())
    return right / len(encoded), loss_sum / count
