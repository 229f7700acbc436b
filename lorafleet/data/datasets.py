"""Datasets, their split among devices (lorafleet/data/partition.py), and tokenised batches.

Datasets live under a data directory (``<data_dir>/sst2/{train,dev}.tsv``,
``<data_dir>/20newsgroups/{train,test}.jsonl.gz``); ``synthetic`` is generated in code (no files);
``jsonl`` is a user's file of prompt/response rows (instruction tuning, lorafleet/data/instructions.py).
Everything that shuffles takes an explicit seed, so shards and batches are reproducible.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lorafleet.data.partition import (
    partition_classes,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
)
from lorafleet.settings import env_name, load_settings
from schemas.config import RunConfig
from schemas.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Split = Literal["train", "eval"]

ENV_DATA_DIR = env_name("data_dir")

#: Files of each dataset, relative to the data directory, per split.
DATASET_FILES: dict[str, dict[str, str]] = {
    "sst2": {"train": "sst2/train.tsv", "eval": "sst2/dev.tsv"},
    "20newsgroups": {"train": "20newsgroups/train.jsonl.gz", "eval": "20newsgroups/test.jsonl.gz"},
    "synthetic": {},
}

_NUM_LABELS = {"sst2": 2, "20newsgroups": 20, "synthetic": 2, "jsonl": 1}

#: The label of tokens that take no part in the loss (transformers' and torch's ignore_index).
IGNORE_INDEX = -100

#: Sizes of the generated synthetic splits.
SYNTHETIC_SIZES = {"train": 4000, "eval": 400}


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels in ``0..num_labels-1``.

    Instruction rows (``responses`` set) are prompts in ``texts`` and the answers in ``responses``;
    their ``labels`` group rows for partitioning and label histograms only (one class for a file).
    ``pairs`` (rows read with ``data.text_pair_field``): each row's second text, tokenised as a pair.
    """

    texts: list[str]
    labels: list[int]
    num_labels: int
    name: str
    responses: list[str] | None = None
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """The rows at ``indices``, in that order."""
        return TextDataset(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            self.num_labels,
            self.name,
            None if self.responses is None else [self.responses[i] for i in indices],
            None if self.pairs is None else [self.pairs[i] for i in indices],
        )


@dataclass(frozen=True)
class EncodedDataset:
    """Token ids per example (no padding), labels, and the tokenizer's pad id.

    For causal-LM rows ``response_starts[i]`` is where row ``i``'s response begins: the loss is taken
    on tokens ``response_starts[i]:`` only (the prompt and the padding are labelled -100).
    """

    input_ids: list[list[int]]
    labels: list[int]
    pad_token_id: int
    response_starts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def causal(self) -> bool:
        """Rows are prompt + response token ids for a causal LM."""
        return self.response_starts is not None

    def subset(self, indices: Sequence[int]) -> EncodedDataset:
        """The rows at ``indices``, in that order."""
        starts = self.response_starts
        return EncodedDataset(
            [self.input_ids[i] for i in indices],
            [self.labels[i] for i in indices],
            self.pad_token_id,
            None if starts is None else [starts[i] for i in indices],
        )


# --------------------------------------------------------------------------- locating files


def num_labels(name: str) -> int:
    """The number of classes of dataset ``name``.

    Raises:
        DataError: unknown dataset.
    """
    if name not in _NUM_LABELS:
        raise DataError(f"unknown dataset {name!r}; known: {sorted(_NUM_LABELS)}")
    return _NUM_LABELS[name]


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _candidates(configured: str | None) -> list[tuple[str, Path]]:
    if configured:
        return [("data.data_dir", Path(configured))]
    data_dir = load_settings().data_dir
    if data_dir is not None:
        return [(f"${ENV_DATA_DIR}", data_dir)]
    return [
        ("../shared/data relative to the working directory", Path.cwd().parent / "shared" / "data"),
        ("../shared/data relative to the repository", _repo_root().parent / "shared" / "data"),
    ]


def resolve_data_dir(configured: str | None, dataset: str | None = None) -> Path:
    """The data directory: ``configured``, else ``$LORAFLEET_DATA_DIR``, else ``../shared/data`` relative
    to the working directory, else relative to the repository root.

    With ``dataset`` given, its files must exist there too.

    Raises:
        DataError: the directory (or the dataset's files) is missing; says what was expected where.
    """
    tried = _candidates(configured)
    found = next((path for _, path in tried if path.is_dir()), None)
    if found is None:
        where = "; ".join(f"{what}: {path}" for what, path in tried)
        raise DataError(f"data directory not found (tried {where}). {_how_to_set(dataset)}")
    if dataset is not None:
        _check_files(found, dataset)
    return found


def _how_to_set(dataset: str | None = None) -> str:
    fetch = (
        f"lorafleet data fetch {dataset}"
        if dataset in ("sst2", "20newsgroups")
        else "lorafleet data fetch sst2"
    )
    return (
        f"Set data.data_dir in the run configuration or the {ENV_DATA_DIR} environment variable to the "
        f"directory that holds sst2/ and 20newsgroups/, or download it: {fetch} --dir DIR."
    )


def _check_files(data_dir: Path, dataset: str) -> None:
    num_labels(dataset)
    missing = [
        str(data_dir / rel) for rel in DATASET_FILES[dataset].values() if not (data_dir / rel).is_file()
    ]
    if missing:
        raise DataError(f"dataset {dataset!r}: expected files {missing} are missing. {_how_to_set(dataset)}")


# --------------------------------------------------------------------------- loading


def load_split(name: str, data_dir: str | Path | None, split: Split) -> TextDataset:
    """The ``train`` or ``eval`` split (SST-2 dev, 20 Newsgroups test) of dataset ``name``.

    ``data_dir`` is resolved with :func:`resolve_data_dir` (ignored for ``synthetic``).

    Raises:
        DataError: unknown dataset or split, missing files.
    """
    n_labels = num_labels(name)
    if split not in ("train", "eval"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'eval'")
    if name == "jsonl":
        raise DataError("data.dataset jsonl is read with load_train/eval_set, which know data.path")
    if name == "synthetic":
        texts, labels = synthetic_rows(SYNTHETIC_SIZES[split], seed=0 if split == "train" else 1)
        return TextDataset(texts, labels, n_labels, name)
    root = resolve_data_dir(None if data_dir is None else str(data_dir), dataset=name)
    path = root / DATASET_FILES[name][split]
    texts, labels = _read_tsv(path) if name == "sst2" else _read_jsonl_gz(path)
    return TextDataset(texts, labels, n_labels, name)


def _read_tsv(path: Path) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != ["sentence", "label"]:
            raise DataError(f"{path}: expected the header 'sentence<TAB>label', got {header!r}")
        for row in reader:
            texts.append(row[0].strip())
            labels.append(int(row[1]))
    return texts, labels


def _read_jsonl_gz(path: Path) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    labels: list[int] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return texts, labels


_POSITIVE = [
    "good",
    "great",
    "excellent",
    "wonderful",
    "superb",
    "delightful",
    "brilliant",
    "lovely",
    "charming",
]
_NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "poor", "weak", "tedious", "clumsy", "dreadful"]
_NEUTRAL = [
    "the",
    "film",
    "movie",
    "plot",
    "story",
    "actors",
    "scenes",
    "script",
    "ending",
    "music",
    "camera",
]
_NEUTRAL += ["director", "it", "this", "was", "a"]


def synthetic_rows(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` generated sentiment-like sentences and labels (1 = positive), deterministic given ``seed``.

    Each sentence mixes 4-10 neutral words with 2-3 words of its polarity and at most one word of the
    other, so the label is learnable from word identity alone.
    """
    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[int] = []
    for _ in range(n):
        label = rng.randint(0, 1)
        own, other = (_POSITIVE, _NEGATIVE) if label else (_NEGATIVE, _POSITIVE)
        words = rng.choices(_NEUTRAL, k=rng.randint(4, 10)) + rng.choices(own, k=rng.randint(2, 3))
        words += rng.choices(other, k=rng.randint(0, 1))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


# --------------------------------------------------------------------------- partitioning


def partition_rows(train: TextDataset, cfg: RunConfig) -> list[list[int]]:
    """Row indices of every device slot's shard under ``cfg.data`` (partition, alpha, classes), seeded
    by ``cfg.seed``.

    Raises:
        ValueError: not enough rows, or a skew the data cannot give.
    """
    data, n, seed = cfg.data, cfg.devices.count, cfg.seed
    if data.partition == "dirichlet":
        return partition_dirichlet(train.labels, n, data.alpha, data.samples_per_device, seed)
    if data.partition == "classes":
        return partition_classes(train.labels, n, data.classes_per_device, data.samples_per_device, seed)
    if data.partition == "quantity":
        return partition_quantity(len(train), n, data.alpha, data.samples_per_device, seed)
    return partition_iid(len(train), n, data.samples_per_device, seed)


def load_train(cfg: RunConfig) -> TextDataset:
    """The training rows of the run: the dataset's train split, as instructions under ``causal_lm``.

    Raises:
        DataError: unknown dataset, missing or malformed files.
    """
    from lorafleet.data.instructions import as_instructions, jsonl_splits  # it builds on this module

    if cfg.data.dataset == "jsonl":
        return jsonl_splits(cfg)[0]
    if cfg.data.path is not None:  # a central file of labelled rows (data.source partition)
        from lorafleet.data.device_rows import read_configured  # it builds on this module

        train = read_configured(cfg.data.path, cfg.data)
    else:
        train = load_split(cfg.data.dataset, cfg.data.data_dir, "train")
    return as_instructions(train) if cfg.model.task == "causal_lm" else train


def load_device_train(cfg: RunConfig, path: str | Path) -> TextDataset:
    """A device's own training rows (``data.source: local``): the labelled rows of its file ``path``
    (lorafleet/data/device_rows.py), as instructions under ``causal_lm``; with ``data.dataset: jsonl``
    the instruction rows of its JSON-lines file.

    Raises:
        DataError: the file is missing, empty or unreadable, lacks a column (a field), or has a label
            outside ``data.labels``; the message starts with the path.
    """
    from lorafleet.data.device_rows import read_configured  # it builds on this module
    from lorafleet.data.instructions import as_instructions, read_jsonl  # it builds on this module

    if cfg.data.dataset == "jsonl":
        return read_jsonl(path, cfg.data.prompt_field, cfg.data.response_field)
    train = read_configured(path, cfg.data)
    return as_instructions(train) if cfg.model.task == "causal_lm" else train


def eval_set(cfg: RunConfig) -> TextDataset:
    """The evaluation split, or a seeded random subset of ``cfg.data.eval_samples`` rows (order kept);
    for ``jsonl`` without ``eval_path``, the rows held out of ``path``."""
    from lorafleet.data.instructions import as_instructions, jsonl_splits, read_jsonl  # builds on this

    if cfg.data.dataset == "jsonl" and cfg.data.source == "local":  # no central training file
        assert cfg.data.eval_path is not None  # the config requires it
        full = read_jsonl(cfg.data.eval_path, cfg.data.prompt_field, cfg.data.response_field)
    elif cfg.data.dataset == "jsonl":
        full = jsonl_splits(cfg)[1]
        if cfg.data.eval_path is None:
            return full
    else:
        if cfg.data.eval_path is not None:  # a file of labelled rows instead of the named set's split
            from lorafleet.data.device_rows import read_configured  # it builds on this module

            full = read_configured(cfg.data.eval_path, cfg.data)
        else:
            full = load_split(cfg.data.dataset, cfg.data.data_dir, "eval")
        full = as_instructions(full) if cfg.model.task == "causal_lm" else full
    wanted = cfg.data.eval_samples
    if wanted is None or wanted >= len(full):
        return full
    return full.subset(sorted(random.Random(cfg.seed).sample(range(len(full)), wanted)))


# --------------------------------------------------------------------------- tokenisation


def encode_dataset(tokenizer: PreTrainedTokenizerBase, ds: TextDataset, max_len: int) -> EncodedDataset:
    """Token ids (truncated to ``max_len``, special tokens added, no padding) and labels of ``ds``;
    instruction rows as :func:`lorafleet.data.instructions.encode_instructions` encodes them."""
    if ds.responses is not None:
        from lorafleet.data.instructions import encode_instructions  # it builds on this module

        return encode_instructions(tokenizer, ds, max_len)
    pairs: dict[str, Any] = {} if ds.pairs is None else {"text_pair": ds.pairs}
    ids = (
        tokenizer(ds.texts, truncation=True, max_length=max_len, padding=False, **pairs)["input_ids"]
        if len(ds)
        else []
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedDataset([list(x) for x in ids], list(ds.labels), int(pad))


def iter_batches(encoded: EncodedDataset, batch_size: int, seed: int | None) -> Iterator[dict[str, Tensor]]:
    """Batches of ``batch_size`` (the last may be smaller), padded to their longest example.

    Yields dicts of ``input_ids``, ``attention_mask``, ``token_type_ids`` (zeros) and ``labels``;
    ``seed=None`` keeps the order, otherwise the order is a permutation seeded by ``seed``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(encoded)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate(encoded, order[start : start + batch_size])


def collate(encoded: EncodedDataset, indices: Sequence[int]) -> dict[str, Tensor]:
    """One dynamically padded batch of the examples at ``indices``.

    Causal-LM rows get no ``token_type_ids`` and per-token ``labels``: the token ids from each row's
    response start on, -100 on the prompt and the padding (the model shifts them by one itself).
    """
    rows = [encoded.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), encoded.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        input_ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[j, : len(row)] = 1
    if encoded.response_starts is not None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for j, i in enumerate(indices):
            start, end = encoded.response_starts[i], len(encoded.input_ids[i])
            labels[j, start:end] = input_ids[j, start:end]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.tensor([encoded.labels[i] for i in indices], dtype=torch.long),
    }
