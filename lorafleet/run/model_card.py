"""The exported adapter's model card: ``OUT/adapter/README.md``, written from the run's report.

A Hugging Face model card: YAML front matter (``library_name: peft``, ``base_model``) and Markdown with
how to load the adapter, its labels, the final metrics, every round's accuracy and loss, and the run's
configuration as it was validated. A pure function of the report and the adapter's own files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def model_card(report: dict[str, Any], adapter_config: dict[str, Any], meta: dict[str, Any]) -> str:
    """The card's text for a run's ``report`` (report.json), its adapter's ``adapter_config.json`` and
    ``lorafleet.json`` (``meta``)."""
    base = str(adapter_config.get("base_model_name_or_path") or meta.get("base_model") or "unknown")
    labels = meta.get("labels")
    front = {"library_name": "peft", "base_model": base, "tags": ["lora", "federated-learning", "lorafleet"]}
    if meta.get("dataset"):
        front["datasets"] = [meta["dataset"]]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [
        f"# {report.get('config', {}).get('run_id', 'lorafleet run')}: LoRA adapter for {base}",
        "",
        f"Trained by federated LoRA ({report.get('strategy')}) with lorafleet on `{meta.get('dataset')}`; "
        f"task `{meta.get('task')}`, {meta.get('num_labels')} labels"
        + (f" ({', '.join(map(str, labels))})." if labels else "."),
        "",
        "## Use",
        "",
        "```python",
        "from peft import AutoPeftModelForSequenceClassification",
        "from transformers import AutoTokenizer",
        "model = AutoPeftModelForSequenceClassification.from_pretrained(",
        f"    ADAPTER_DIR, num_labels={meta.get('num_labels')}",
        ")",
        "tokenizer = AutoTokenizer.from_pretrained(ADAPTER_DIR)",
        "```",
        "",
        f"(the base model `{base}` must be loadable: from the Hub, the local cache, or a local copy named "
        "in `adapter_config.json`'s `base_model_name_or_path`). `lorafleet predict ADAPTER_DIR --text ...` "
        "classifies, `lorafleet merge ADAPTER_DIR OUT` writes a merged model.",
        "",
        "## Final metrics",
        "",
        *_metrics(report),
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(report.get("config", {}), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _metrics(report: dict[str, Any]) -> list[str]:
    rows = [
        f"| final round | {report.get('final_round')} |",
        f"| final accuracy (evaluation split) | {report.get('final_accuracy')} |",
        f"| finish reason | {report.get('finish_reason')} |",
        f"| wall seconds | {report.get('wall_time_s')} |",
        f"| virtual seconds | {report.get('virtual_time_s')} |",
    ]
    if report.get("final_federated_accuracy") is not None:
        rows.append(f"| final federated accuracy | {report['final_federated_accuracy']} |")
    per_round = [
        f"| {r.get('round')} | {r.get('accuracy')} | {r.get('loss')} | {r.get('wall_time_s')} |"
        for r in report.get("rounds", [])
    ]
    return [
        "| | |",
        "|---|---|",
        *rows,
        "",
        "| round | accuracy | loss | wall s |",
        "|---|---|---|---|",
        *per_round,
    ]


def write_model_card(adapter_dir: Path, report: dict[str, Any]) -> Path:
    """Write ``adapter_dir/README.md`` for ``report``; returns its path."""
    adapter_config = _read_json(adapter_dir / "adapter_config.json")
    meta = _read_json(adapter_dir / "lorafleet.json")
    path = adapter_dir / "README.md"
    path.write_text(model_card(report, adapter_config, meta), encoding="utf-8")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
