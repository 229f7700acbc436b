"""Loading an exported adapter folder on its own: its base model, its tokenizer, its labels.

An adapter folder (``OUT/adapter`` or any ``checkpoints/round-NNNN``) holds the peft files, the
tokenizer's files and ``lorafleet.json``. :func:`load_adapter` rebuilds the classifier from them
the way the run evaluated it, so predictions are the run's: the base model is ``base`` when given (a
local folder), else the one the run named (``minilm``: the packaged MiniLM; ``tiny``: rebuilt from
the recorded seed; a folder that exists here). :func:`predict` classifies texts; :func:`merge` folds
the LoRA into the base weights and writes a plain transformers model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lorafleet.data.datasets import TextDataset, encode_dataset, iter_batches
from lorafleet.ml.model import forward_inputs, load_base_model
from schemas.config import ModelConfig
from schemas.errors import LorafleetError


class AdapterError(LorafleetError):
    """An adapter folder that cannot be used here (missing files, a base model not found)."""


@dataclass(frozen=True)
class LoadedAdapter:
    """A classifier rebuilt from an adapter folder, in eval mode."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    labels: list[str]
    max_seq_len: int
    meta: dict[str, Any]


def read_meta(adapter_dir: Path) -> dict[str, Any]:
    """``lorafleet.json`` of ``adapter_dir``.

    Raises:
        AdapterError: the folder is not an adapter lorafleet wrote.
    """
    path = Path(adapter_dir) / "lorafleet.json"
    if not (Path(adapter_dir) / "adapter_config.json").is_file() or not path.is_file():
        raise AdapterError(f"{adapter_dir} is not an adapter folder (adapter_config.json and lorafleet.json)")
    meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return meta


def base_model_config(meta: dict[str, Any], base: Path | None) -> ModelConfig:
    """The model configuration the adapter's base is loaded with: the run's, its name replaced by
    ``base`` when given.

    Raises:
        AdapterError: no ``base`` given and the run's model folder is not on this machine.
    """
    cfg = ModelConfig.model_validate(meta["model"])
    if base is not None:
        if not base.is_dir():
            raise AdapterError(f"--base {base}: no such folder")
        return cfg.model_copy(update={"name": str(base)})
    if cfg.name not in ("minilm", "tiny") and not Path(cfg.name).is_dir():
        raise AdapterError(
            f"the base model {meta.get('base_model')!r} (trained from {cfg.name}) is not on this machine; "
            "give a local copy with --base PATH"
        )
    return cfg


def load_adapter(adapter_dir: Path, base: Path | None = None) -> LoadedAdapter:
    """The classifier of ``adapter_dir`` on its base model (``base``: a local folder of it).

    Raises:
        AdapterError: not an adapter folder, not a classifier, or its base model is not here.
    """
    adapter_dir = Path(adapter_dir)
    meta = read_meta(adapter_dir)
    if meta.get("task", "sequence_classification") != "sequence_classification":
        raise AdapterError(
            f"{adapter_dir} is a {meta.get('task')} adapter; predict and merge take classifiers"
        )
    cfg = base_model_config(meta, base)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "right"
    num_labels = int(meta["num_labels"])
    base_model = load_base_model(cfg, num_labels, int(meta.get("seed", 0)), tokenizer)
    model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    model.eval()
    labels = meta.get("labels") or [str(i) for i in range(num_labels)]
    return LoadedAdapter(model, tokenizer, [str(x) for x in labels], cfg.max_seq_len, meta)


@torch.no_grad()
def predict(adapter: LoadedAdapter, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
    """One prediction per text, in order: ``text``, ``label`` (its name), ``label_id`` and ``scores``
    (each label's probability). Texts are tokenised and padded as the run's evaluation did."""
    encoded = encode_dataset(
        adapter.tokenizer,
        TextDataset(list(texts), [0] * len(texts), len(adapter.labels), "predict"),
        adapter.max_seq_len,
    )
    out: list[dict[str, Any]] = []
    for batch in iter_batches(encoded, batch_size, seed=None):
        batch.pop("labels")
        probs = adapter.model(**forward_inputs(batch)).logits.float().softmax(-1)
        for row in probs:
            best = int(row.argmax())
            out.append(
                {
                    "label": adapter.labels[best],
                    "label_id": best,
                    "scores": {name: round(float(p), 6) for name, p in zip(adapter.labels, row, strict=True)},
                }
            )
    return [{"text": text, **p} for text, p in zip(texts, out, strict=True)]


def merge(adapter_dir: Path, out_dir: Path, base: Path | None = None) -> Path:
    """Write the base model with the adapter's LoRA folded in (and its trained head) to ``out_dir``,
    with the tokenizer and the label names in its config: ``AutoModelForSequenceClassification`` and
    ``AutoTokenizer`` load it without peft or lorafleet. Returns ``out_dir``.

    Raises:
        AdapterError: as :func:`load_adapter`.
    """
    adapter = load_adapter(adapter_dir, base)
    merged = adapter.model.merge_and_unload()
    merged.config.id2label = dict(enumerate(adapter.labels))
    merged.config.label2id = {name: i for i, name in enumerate(adapter.labels)}
    merged.config.name_or_path = str(adapter.meta.get("base_model", ""))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    adapter.tokenizer.save_pretrained(str(out_dir))
    return out_dir
