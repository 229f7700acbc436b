"""Fixtures for the ML tests: a tiny random BERT and the synthetic dataset (fast, no files)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.data.datasets import EncodedDataset, encode_dataset, load_split
from lorafleet.ml.model import AdapterRuntime, load_tokenizer
from schemas.config import ModelConfig
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
