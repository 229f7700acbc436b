"""The real all-MiniLM-L6-v2: a few training steps on SST-2 rows and a PEFT checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lorafleet.data.datasets import encode_dataset, iter_batches, load_split
from lorafleet.ml.model import AdapterRuntime, load_base_model, load_tokenizer
from schemas.config import ModelConfig
from schemas.errors import DataError
from tests.ml.conftest import make_spec, make_task
from worker.trainer import LoraTrainer

MINILM = ModelConfig(name="minilm", max_seq_len=64)


@pytest.mark.ml
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_minilm_trains_and_round_trips_a_peft_checkpoint(tmp_path: Path) -> None:
    try:
        rows = load_split("sst2", None, "train").subset(range(64))
    except DataError as exc:
        pytest.skip(str(exc))
    encoded = encode_dataset(load_tokenizer(MINILM), rows, MINILM.max_seq_len)
    runtime = AdapterRuntime(MINILM, num_labels=2, seed=0)
    assert runtime.num_blocks == 6
    spec = make_spec({i: 8 for i in range(6)})
    start = runtime.initial_adapter(spec, 0)
    assert len(start) == 26
    outcome = LoraTrainer(runtime, encoded).train(make_task(spec, start, batch_size=16, max_steps=4), start)
    assert outcome.metrics.steps == 4
    assert all(not torch.equal(start[k], outcome.tensors[k]) for k in start)

    runtime.save_peft_checkpoint(spec, outcome.tensors, tmp_path, dataset="sst2")
    batch = {k: v for k, v in next(iter_batches(encoded, 16, seed=None)).items() if k != "labels"}
    model = runtime.load(spec, outcome.tensors).eval()
    restored = PeftModel.from_pretrained(load_base_model(MINILM, num_labels=2, seed=0), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(restored(**batch).logits, model(**batch).logits)
