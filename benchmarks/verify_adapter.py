"""Load a run's final adapter with plain transformers + peft and re-measure its accuracy (not a test).

    python benchmarks/verify_adapter.py runs/quickstart

Independent of lorafleet's runtime: the base model comes from ``AutoModelForSequenceClassification``
and the adapter from ``PeftModel.from_pretrained(base, RUN/adapter)``; only the dev set and its
tokenisation use lorafleet's data helpers. Prints JSON and exits non-zero if the accuracy differs
from ``report.json``'s ``final_accuracy`` by more than 1e-6.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def accuracy_of_adapter(run_dir: Path) -> tuple[float, float]:
    """(accuracy from plain peft, accuracy in report.json)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lorafleet.data.datasets import encode_dataset, eval_set, iter_batches
    from lorafleet.ml.model import load_base_model, load_tokenizer, model_path
    from schemas.config import parse_run_config

    report = json.loads((run_dir / "report.json").read_text())
    config = parse_run_config(report["config"])
    meta = json.loads((run_dir / "adapter" / "lorafleet.json").read_text())
    if config.model.name == "tiny":
        base = load_base_model(config.model, meta["num_labels"], seed=config.seed)  # no files on disk to load
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            model_path(config.model),
            num_labels=meta["num_labels"],  # the adapter names it by its public id
        )
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    encoded = encode_dataset(load_tokenizer(config.model), eval_set(config), config.model.max_seq_len)
    correct = 0
    with torch.no_grad():
        for batch in iter_batches(encoded, 64, seed=None):
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(encoded), float(report["final_accuracy"])


def main() -> None:
    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
    measured, reported = accuracy_of_adapter(run_dir)
    print(
        json.dumps(
            {
                "run": str(run_dir),
                "peft_from_pretrained_accuracy": measured,
                "reported_final_accuracy": reported,
                "match": abs(measured - reported) <= 1e-6,
            }
        )
    )
    sys.exit(0 if abs(measured - reported) <= 1e-6 else 1)


if __name__ == "__main__":
    main()
