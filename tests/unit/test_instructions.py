"""Instruction rows: reading a JSON-lines file, holding rows out, tokens with and without a chat template,
and batches whose loss covers the response tokens only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet.data.datasets import IGNORE_INDEX, TextDataset, collate, eval_set, load_split, load_train
from lorafleet.data.instructions import (
    as_instructions,
    encode_instructions,
    fit,
    instruction_tokens,
    jsonl_splits,
    read_jsonl,
)
from lorafleet.ml.tiny import SIMPLE_CHAT_TEMPLATE, train_tokenizer
from schemas.config import RunConfig, parse_run_config
from schemas.errors import DataError

ROWS = [{"q": f"what is {i} plus one ?", "a": str(i + 1), "id": i} for i in range(20)]
TEXTS = [f"{r['q']} {r['a']}" for r in ROWS]


def _jsonl(path: Path, rows: list[Any], blank: bool = False) -> Path:
    lines = [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + ("\n\n" if blank else "\n"), encoding="utf-8")
    return path


def _config(path: Path, **data: Any) -> RunConfig:
    return parse_run_config(
        {
            "model": {"name": "tiny", "tiny_family": "llama", "task": "causal_lm"},
            "data": {
                "dataset": "jsonl",
                "path": str(path),
                "prompt_field": "q",
                "response_field": "a",
                **data,
            },
        }
    )


def test_rows_are_read_from_the_configured_fields(tmp_path: Path) -> None:
    ds = read_jsonl(_jsonl(tmp_path / "rows.jsonl", ROWS, blank=True), "q", "a")
    assert len(ds) == 20 and ds.texts[3] == "what is 3 plus one ?" and ds.responses is not None
    assert ds.responses[3] == "4" and ds.labels == [0] * 20 and ds.num_labels == 1
    sub = ds.subset([5, 1])
    assert sub.texts == [ds.texts[5], ds.texts[1]] and sub.responses == ["6", "2"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"q": "x", "a": "y"}\nnot json\n', r"rows.jsonl:2: not JSON"),
        ('["q", "a"]\n', r"rows.jsonl:1: a row must be a JSON object, got list"),
        ('{"q": "x"}\n', r"rows.jsonl:1: field 'a' must be a string, got nothing \(fields: \['q'\]\)"),
        ('{"q": "x", "a": 3}\n', r"rows.jsonl:1: field 'a' must be a string, got int"),
        ("\n\n", r"rows.jsonl: no rows"),
    ],
)
def test_bad_files_are_refused_naming_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_jsonl(path, "q", "a")
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl", "q", "a")


def test_evaluation_rows_are_held_out_of_the_file_or_read_from_their_own(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", ROWS)
    train, held = jsonl_splits(_config(path))
    assert (len(train), len(held)) == (18, 2)  # a tenth held out
    assert set(train.texts).isdisjoint(held.texts) and set(train.texts) | set(held.texts) == {
        r["q"] for r in ROWS
    }
    assert jsonl_splits(_config(path)) == (train, held)  # seeded
    assert load_train(_config(path)) == train and eval_set(_config(path)) == held
    five = _config(path, eval_samples=5)
    assert len(eval_set(five)) == 5 and len(load_train(five)) == 15
    other = _jsonl(tmp_path / "eval.jsonl", ROWS[:3])
    separate = _config(path, eval_path=str(other))
    assert len(load_train(separate)) == 20 and eval_set(separate).texts == [r["q"] for r in ROWS[:3]]
    with pytest.raises(DataError, match="too few to hold 20 out"):
        jsonl_splits(_config(path, eval_samples=20))


def test_sentiment_rows_become_one_word_questions() -> None:
    rows = load_split("synthetic", None, "eval").subset(range(4))
    asked = as_instructions(rows)
    assert (
        asked.responses == [("negative", "positive")[y] for y in rows.labels] and asked.labels == rows.labels
    )
    assert asked.texts[0] == f"Is this review positive or negative? Review: {rows.texts[0]}"
    with pytest.raises(DataError, match="20 classes"):
        as_instructions(TextDataset(["x"], [0], 20, "20newsgroups"))


def test_without_a_chat_template_the_response_is_the_answer_then_the_end_token() -> None:
    tok = train_tokenizer(TEXTS, encoder=False)
    prompt, response = instruction_tokens(tok, "what is 3 plus one ?", "4")
    assert prompt == tok("what is 3 plus one ?")["input_ids"] and prompt[0] == tok.bos_token_id
    assert response == tok("4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_with_a_chat_template_the_response_is_what_the_assistant_turn_adds() -> None:
    tok = train_tokenizer(TEXTS, encoder=False, chat_template=SIMPLE_CHAT_TEMPLATE)
    prompt, response = instruction_tokens(tok, "what is 3 plus one ?", "4")
    marks = tok.convert_ids_to_tokens(prompt + response)
    assert "<|user|>" in marks and "<|end|>" in tok.convert_ids_to_tokens(response)
    assert tok.decode(prompt).rstrip().endswith("<|assistant|>")
    assert "4" in tok.decode(response)


def test_long_rows_keep_the_response_and_the_end_of_the_prompt() -> None:
    assert fit([1, 2, 3], [7, 8], 8) == ([1, 2, 3], [7, 8])
    assert fit([1, 2, 3, 4, 5], [7, 8], 4) == ([4, 5], [7, 8])
    assert fit([1, 2, 3], [7, 8, 9, 10, 11], 4) == ([3], [7, 8, 9])


def test_batches_take_the_loss_on_the_responses_only() -> None:
    tok = train_tokenizer(TEXTS, encoder=False)
    rows = TextDataset(["what is 1 plus one ?", "what is 12 plus one ?"], [0, 0], 1, "t", ["2", "13"])
    encoded = encode_instructions(tok, rows, max_len=32)
    assert encoded.causal and encoded.response_starts is not None
    batch = collate(encoded, [0, 1])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # no token types for a decoder
    for j in range(2):
        start, length = encoded.response_starts[j], len(encoded.input_ids[j])
        labels, ids = batch["labels"][j].tolist(), batch["input_ids"][j].tolist()
        assert labels[:start] == [IGNORE_INDEX] * start  # the prompt
        assert labels[start:length] == ids[start:length]  # the response and the end token
        assert labels[length:] == [IGNORE_INDEX] * (len(labels) - length)  # padding
        assert batch["attention_mask"][j].sum() == length
    with pytest.raises(ValueError, match="no responses"):
        encode_instructions(tok, TextDataset(["x"], [0], 1, "t"), 8)
