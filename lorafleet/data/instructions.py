"""Instruction rows for causal-LM tuning: reading them, and their tokens with the loss mask.

A row is a prompt and a response. ``data.dataset: jsonl`` reads them from a local JSON-lines file
(``data.path``; one object per line, the strings under ``data.prompt_field`` and
``data.response_field``); the labelled sentiment sets (``synthetic``, ``sst2``) become rows whose
prompt asks for the sentiment and whose response is one word (:func:`as_instructions`).

Tokens (:func:`instruction_tokens`): with a chat template, the prompt is the user turn plus the
generation prompt and the response is what the assistant turn adds to it (its end-of-turn marker
included; it starts where the two tokenisations part, should a merge cross the boundary); without
one, the prompt is the text as the tokenizer encodes it (its own special tokens included) and the
response is the answer's tokens followed by the end-of-sequence token. The loss is taken on the
response tokens only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.data.datasets import EncodedDataset, TextDataset
from schemas.config import RunConfig
from schemas.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: The one-word answers of the sentiment sets asked as instructions (label 0, label 1).
SENTIMENT_ANSWERS = ("negative", "positive")
SENTIMENT_PROMPT = "Is this review positive or negative? Review: {text}"

#: Held out of ``data.path`` for evaluation when there is no ``data.eval_path`` and no ``eval_samples``.
HELD_OUT_FRACTION = 0.1


def as_instructions(ds: TextDataset) -> TextDataset:
    """A binary sentiment set as instruction rows (the labels kept, for partitioning).

    Raises:
        DataError: ``ds`` is not a two-class set.
    """
    if ds.num_labels != len(SENTIMENT_ANSWERS):
        raise DataError(
            f"dataset {ds.name!r} has {ds.num_labels} classes; only sentiment sets become instructions"
        )
    prompts = [SENTIMENT_PROMPT.format(text=t) for t in ds.texts]
    return TextDataset(
        prompts, list(ds.labels), ds.num_labels, ds.name, [SENTIMENT_ANSWERS[y] for y in ds.labels]
    )


def read_jsonl(path: str | Path, prompt_field: str, response_field: str) -> TextDataset:
    """The prompt/response rows of a JSON-lines file (blank lines skipped), all in one class.

    Raises:
        DataError: the file is missing or empty, a line is not a JSON object, or a row lacks a field or
            holds a non-string there; the message starts with the file (and line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (it does not exist)")
    prompts: list[str] = []
    responses: list[str] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = _parse_row(line, f"{path}:{number}")
            prompts.append(_field(row, prompt_field, f"{path}:{number}"))
            responses.append(_field(row, response_field, f"{path}:{number}"))
    if not prompts:
        raise DataError(f"{path}: no rows (the file is empty)")
    return TextDataset(prompts, [0] * len(prompts), 1, "jsonl", responses)


def _parse_row(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    return row


def _field(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        got = "nothing" if name not in row else type(value).__name__
        raise DataError(f"{where}: field {name!r} must be a string, got {got} (fields: {sorted(row)})")
    return value


def jsonl_splits(cfg: RunConfig) -> tuple[TextDataset, TextDataset]:
    """(train, eval) rows of ``data.dataset: jsonl``: ``path`` and ``eval_path``, or, without
    ``eval_path``, ``path`` split by a seeded draw of ``eval_samples`` rows (default a tenth, at least
    one) held out for evaluation.

    Raises:
        DataError: as :func:`read_jsonl`, or too few rows to hold any out.
    """
    data = cfg.data
    assert data.path is not None  # the config requires it for jsonl
    rows = read_jsonl(data.path, data.prompt_field, data.response_field)
    if data.eval_path is not None:
        return rows, read_jsonl(data.eval_path, data.prompt_field, data.response_field)
    held = data.eval_samples or max(1, round(HELD_OUT_FRACTION * len(rows)))
    if held >= len(rows):
        raise DataError(f"{data.path}: {len(rows)} rows, too few to hold {held} out for evaluation")
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    return rows.subset(sorted(order[held:])), rows.subset(sorted(order[:held]))


# --------------------------------------------------------------------------- tokens


def instruction_tokens(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one row, as the module docstring describes."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = _chat_ids(tokenizer, user, generation_prompt=True)
        turn = [*user, {"role": "assistant", "content": response}]
        full = _chat_ids(tokenizer, turn, generation_prompt=False)
        # the response starts where the two tokenisations part (a BPE may merge the generation
        # prompt's last characters into the answer's first token)
        start = next((i for i, (a, b) in enumerate(zip(head, full, strict=False)) if a != b), len(head))
        if 0 < start < len(full):
            return full[:start], full[start:]
    head = list(tokenizer(prompt)["input_ids"])
    answer = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return head, answer + ([int(end)] if end is not None else [])


def _chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool
) -> list[int]:
    out: Any = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return [int(i) for i in ids]


def fit(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut a row to ``max_len`` tokens: the response keeps up to ``max_len - 1`` of its first tokens,
    the prompt its last tokens (where the generation prompt is) in the room left, at least one."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    response = response[: max_len - 1]
    return prompt[len(prompt) - (max_len - len(response)) :], response


def encode_instructions(tokenizer: PreTrainedTokenizerBase, ds: TextDataset, max_len: int) -> EncodedDataset:
    """Token ids of every row (prompt then response, at most ``max_len``, no padding), with where each
    response starts.

    Raises:
        ValueError: ``ds`` has no responses.
    """
    if ds.responses is None:
        raise ValueError(f"dataset {ds.name!r} has no responses")
    ids: list[list[int]] = []
    starts: list[int] = []
    for prompt, response in zip(ds.texts, ds.responses, strict=True):
        head, answer = fit(*instruction_tokens(tokenizer, prompt, response), max_len)
        ids.append(head + answer)
        starts.append(len(head))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedDataset(ids, list(ds.labels), int(pad), starts)
