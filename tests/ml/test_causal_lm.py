"""Causal-LM instruction tuning end to end: prompt/response rows from a JSON-lines file, the loss on the
responses only, evaluation as loss, perplexity and exact match, adapters that peft reloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from aggregator.evaluation import evaluate
from lorafleet.app.embedded import run_embedded
from lorafleet.app.wiring import build_runtime, with_model_defaults
from lorafleet.data.datasets import encode_dataset, eval_set
from orchestrator.planners.specs import global_spec
from schemas.config import load_run_config, parse_run_config
from tests.ml.conftest import ModelFolder, plain_peft_metrics

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "causal_lm_tiny.yaml"

OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("left", "right"), ("open", "closed")]
OPPOSITES += [("fast", "slow"), ("light", "dark"), ("early", "late"), ("full", "empty"), ("happy", "sad")]
TEMPLATES = ["what is the opposite of {} ?", "give the opposite of {} .", "opposite of {} :"]


def instruction_rows(n: int, seed: int) -> list[dict[str, str]]:
    """A small generated instruction set: name the opposite of a word, one-word answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word, answer = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            word, answer = answer, word
        rows.append({"question": rng.choice(TEMPLATES).format(word), "answer": answer})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers flag
def test_instruction_tuning_a_tiny_llama_lowers_the_eval_loss(
    model_folder: ModelFolder, tmp_path: Path
) -> None:
    # Given a tiny Llama with a chat template and a generated instruction set in a JSON-lines file
    rows = instruction_rows(360, seed=0)
    words = tuple(f"{r['question']} {r['answer']}" for r in rows)
    folder = model_folder("llama", task="causal_lm", layers=2, chat=True, extra_texts=words, hidden=64)
    config = parse_run_config(
        {
            "run_id": "sft",
            "strategy": "legend",
            "model": {"name": str(folder), "task": "causal_lm", "max_seq_len": 32, "torch_threads": 1},
            "data": {
                "dataset": "jsonl",
                "path": str(_write_jsonl(tmp_path / "rows.jsonl", rows)),
                "prompt_field": "question",
                "response_field": "answer",
                "samples_per_device": 100,
                "eval_samples": 40,
            },
            "devices": {"count": 3},
            "lora": {"rank": 8},
            "training": {"lr": 1.0e-2, "local_epochs": 2, "batch_size": 8},
            "rounds": {"max_rounds": 3, "target_metric": "perplexity", "target": 1.01},
        }
    )
    runtime = build_runtime(config)
    resolved = with_model_defaults(config, runtime)
    assert resolved.lora.target_modules == ["q_proj", "v_proj"]  # Llama's default from peft's table
    spec = global_spec(resolved, runtime.num_blocks)
    encoded = encode_dataset(runtime.tokenizer, eval_set(config), config.model.max_seq_len)
    before = evaluate(runtime, spec, runtime.initial_adapter(spec, seed=config.seed), encoded)
    # When three federated rounds tune LoRA on the devices' rows (lm_head stays frozen)
    report = run_embedded(config, tmp_path / "run", quiet=True)
    # Then the eval loss falls by at least 30% over the run and the target metric is not yet reached
    losses = [r["loss"] for r in report["rounds"]]
    assert len(losses) == 3 and losses[-1] <= 0.7 * before.loss, (before.loss, losses)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["rounds"])
    assert not config.rounds.target_reached(report["rounds"][-1]["accuracy"], losses[-1])
    # and the exported adapter is LoRA only (no head), which plain peft reloads to the same metrics
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and not adapter["modules_to_save"]
    accuracy, loss = plain_peft_metrics(tmp_path / "run", folder)
    assert accuracy == report["final_accuracy"]
    assert loss == pytest.approx(losses[-1], rel=1e-5)


def test_the_causal_lm_example_runs(tmp_path: Path) -> None:
    # the example as shipped, cut to two short rounds
    overrides = {
        "model": {"torch_threads": 1},
        "data": {"samples_per_device": 32, "eval_samples": 16},
        "rounds": {"max_rounds": 2},
    }
    config = load_run_config(EXAMPLE, overrides)
    assert config.model.task == "causal_lm" and config.rounds.target_metric == "loss"
    report = run_embedded(config, tmp_path, quiet=True)
    losses = [r["loss"] for r in report["rounds"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
